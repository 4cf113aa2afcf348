"""Unit tests for devtools.ncrontab: NCRONTAB (six fields, UTC) and TimeSpan schedules."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest

from devtools.ncrontab import next_occurrence, parse_schedule

UTC = UTC


def occurrences(expr: str, start: datetime, count: int) -> list[datetime]:
    result, current = [], start
    for _ in range(count):
        current = next_occurrence(expr, current)
        result.append(current)
    return result


def test_every_30_minutes():
    start = datetime(2024, 5, 1, 10, 7, 13)
    assert occurrences("0 */30 * * * *", start, 3) == [
        datetime(2024, 5, 1, 10, 30),
        datetime(2024, 5, 1, 11, 0),
        datetime(2024, 5, 1, 11, 30),
    ]


def test_result_is_strictly_after_the_given_time():
    on_schedule = datetime(2024, 5, 1, 10, 30)
    assert next_occurrence("0 */30 * * * *", on_schedule) == datetime(2024, 5, 1, 11, 0)
    # a fraction of a second past an occurrence still moves on to the next one
    assert next_occurrence("*/15 * * * * *", on_schedule.replace(microsecond=1)) == datetime(2024, 5, 1, 10, 30, 15)


def test_daily_at_two():
    assert next_occurrence("0 0 2 * * *", datetime(2024, 5, 1, 1, 59, 59)) == datetime(2024, 5, 1, 2, 0)
    assert next_occurrence("0 0 2 * * *", datetime(2024, 5, 1, 2, 0)) == datetime(2024, 5, 2, 2, 0)


def test_every_15_seconds():
    assert occurrences("*/15 * * * * *", datetime(2024, 5, 1, 23, 59, 31), 3) == [
        datetime(2024, 5, 1, 23, 59, 45),
        datetime(2024, 5, 2, 0, 0, 0),
        datetime(2024, 5, 2, 0, 0, 15),
    ]


def test_ranges_lists_and_stepped_ranges():
    # minutes 5 and 10-20 every 5 -> 5, 10, 15, 20 during 09:00-10:59
    assert occurrences("0 5,10-20/5 9-10 * * *", datetime(2024, 5, 1, 9, 6), 5) == [
        datetime(2024, 5, 1, 9, 10),
        datetime(2024, 5, 1, 9, 15),
        datetime(2024, 5, 1, 9, 20),
        datetime(2024, 5, 1, 10, 5),
        datetime(2024, 5, 1, 10, 10),
    ]
    # a single value with a step runs from that value to the field's end: 50/5 = 50, 55
    assert occurrences("50/5 * * * * *", datetime(2024, 5, 1, 0, 0, 0), 3) == [
        datetime(2024, 5, 1, 0, 0, 50),
        datetime(2024, 5, 1, 0, 0, 55),
        datetime(2024, 5, 1, 0, 1, 50),
    ]


def test_day_of_week_numbers_and_names():
    friday = datetime(2024, 5, 3, 12, 0)  # a Friday
    weekdays_at_nine = occurrences("0 0 9 * * 1-5", friday, 2)
    assert weekdays_at_nine == [datetime(2024, 5, 6, 9, 0), datetime(2024, 5, 7, 9, 0)]  # Mon, Tue
    assert occurrences("0 0 9 * * MON-FRI", friday, 2) == weekdays_at_nine
    assert next_occurrence("0 0 0 * * SUN", friday) == datetime(2024, 5, 5)  # 0 = Sunday
    assert next_occurrence("0 0 0 * * sat,Sunday", friday) == datetime(2024, 5, 4)


def test_day_and_day_of_week_must_both_match_like_ncrontab():
    # Friday the 13th (NCrontab ANDs the two fields; Unix cron would OR them)
    assert next_occurrence("0 0 0 13 * FRI", datetime(2024, 1, 1)) == datetime(2024, 9, 13)


def test_month_and_year_rollovers():
    assert next_occurrence("0 0 0 1 * *", datetime(2024, 1, 31, 23, 59, 59)) == datetime(2024, 2, 1)
    assert next_occurrence("59 59 23 31 12 *", datetime(2024, 12, 31, 23, 59, 59)) == datetime(2025, 12, 31, 23, 59, 59)
    # the 31st skips months without one
    assert occurrences("0 0 0 31 * *", datetime(2024, 1, 31), 2) == [datetime(2024, 3, 31), datetime(2024, 5, 31)]
    # 29 February only in leap years
    assert next_occurrence("0 0 0 29 2 *", datetime(2024, 3, 1)) == datetime(2028, 2, 29)
    assert next_occurrence("0 30 6 1 JAN,jul *", datetime(2024, 2, 1)) == datetime(2024, 7, 1, 6, 30)


def test_aware_datetimes_are_converted_to_utc():
    plus_two = timezone(timedelta(hours=2))
    result = next_occurrence("0 0 2 * * *", datetime(2024, 5, 1, 3, 0, tzinfo=plus_two))  # 01:00 UTC
    assert result == datetime(2024, 5, 1, 2, 0, tzinfo=UTC)
    assert result.tzinfo == UTC


def test_timespan_schedule():
    start = datetime(2024, 5, 1, 10, 0)
    assert next_occurrence("00:05:00", start) == datetime(2024, 5, 1, 10, 5)
    assert next_occurrence("1.00:00:00", start) == datetime(2024, 5, 2, 10, 0)
    assert str(parse_schedule("00:00:30")) == "00:00:30"


@pytest.mark.parametrize(
    "expr",
    [
        "",  # empty
        "* * * * *",  # five-field Unix cron: the seconds field is missing
        "0 * * * * * *",  # seven fields
        "60 * * * * *",  # second out of range
        "0 60 * * * *",  # minute out of range
        "0 0 24 * * *",  # hour out of range
        "0 0 0 0 * *",  # day out of range
        "0 0 0 1 13 *",  # month out of range
        "0 0 0 * * 7",  # day of week is 0-6
        "0 0 0 * FOO *",  # unknown name
        "*/0 * * * * *",  # zero step
        "0 22-2 * * * *",  # reversed range
        "0 1,,2 * * * *",  # empty list item
        "0 0 0 30 2 *",  # never occurs
        "0 0 0 ? * MON",  # Quartz syntax is not NCRONTAB
        "25:00:00",  # TimeSpan hours out of range
        "00:00:00",  # zero interval
    ],
)
def test_invalid_expressions_raise_value_error(expr):
    with pytest.raises(ValueError):
        next_occurrence(expr, datetime(2024, 1, 1))


def test_five_field_error_explains_the_fix():
    with pytest.raises(ValueError, match="0 \\*/5 \\* \\* \\* \\*"):
        next_occurrence("*/5 * * * *", datetime(2024, 1, 1))
