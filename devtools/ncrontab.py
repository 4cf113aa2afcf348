"""Timer-trigger schedules as the Azure Functions host understands them.

Two schedule forms exist for ``@app.timer_trigger(schedule=...)``:

* **NCRONTAB**, six fields: ``{second} {minute} {hour} {day} {month} {day-of-week}``.
  Each field is ``*``, a value, a range ``a-b``, a step ``*/n`` / ``a-b/n`` / ``a/n``
  (``a/n`` means "from ``a`` to the field's maximum, every ``n``"), or a comma list of those.
  Months accept ``JAN``..``DEC`` and days of week ``SUN``..``SAT`` (0 = Sunday .. 6 = Saturday),
  case-insensitive, abbreviated or in full.
* **TimeSpan** ``[d.]hh:mm[:ss]`` - a fixed interval (App Service plans only in Azure).

Semantics follow the NCrontab library used by the Functions host, including one trap worth
knowing: when both *day* and *day-of-week* are restricted, an occurrence must match **both**
(``0 0 0 13 * FRI`` = Friday the 13th), unlike classic Unix cron where either one suffices.

Deliberate strictness (the dev host should surface likely mistakes, not hide them):

* five-field Unix crons are rejected - add the leading seconds field (usually ``0``);
* a reversed range such as ``22-2`` is rejected; NCrontab would silently read it as ``2-22``
  (never as a wrap-around over midnight).

All times are UTC. ``next_occurrence(expr, after)`` returns the first occurrence strictly after
``after``: a naive ``after`` is taken as UTC and a naive result is returned; an aware ``after``
is converted to UTC and an aware UTC datetime is returned.
"""

from __future__ import annotations

import bisect
import calendar
import functools
import re
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta

__all__ = [
    "CronSchedule",
    "IntervalSchedule",
    "Schedule",
    "next_occurrence",
    "parse_cron",
    "parse_schedule",
    "parse_timespan",
]

_MONTH_NAMES = [
    "january",
    "february",
    "march",
    "april",
    "may",
    "june",
    "july",
    "august",
    "september",
    "october",
    "november",
    "december",
]
_DOW_NAMES = ["sunday", "monday", "tuesday", "wednesday", "thursday", "friday", "saturday"]


@dataclass(frozen=True)
class _FieldSpec:
    label: str
    low: int
    high: int
    names: tuple[str, ...] = ()


_FIELDS = (
    _FieldSpec("second", 0, 59),
    _FieldSpec("minute", 0, 59),
    _FieldSpec("hour", 0, 23),
    _FieldSpec("day", 1, 31),
    _FieldSpec("month", 1, 12, tuple(_MONTH_NAMES)),
    _FieldSpec("day-of-week", 0, 6, tuple(_DOW_NAMES)),
)

# The Gregorian calendar repeats every 400 years: nothing found in that window means never.
_SEARCH_YEARS = 401

_TIMESPAN_RE = re.compile(r"^(?:(\d+)\.)?(\d{1,2}):(\d{1,2})(?::(\d{1,2}))?$")


def _parse_value(text: str, spec: _FieldSpec, expr: str) -> int:
    if text.isdigit():
        value = int(text)
    else:
        lowered = text.lower()
        matches = [i for i, name in enumerate(spec.names) if len(lowered) >= 3 and name.startswith(lowered)]
        if not matches:
            raise ValueError(f"invalid {spec.label} value {text!r} in NCRONTAB expression {expr!r}")
        value = matches[0] + spec.low
    if not spec.low <= value <= spec.high:
        raise ValueError(f"{spec.label} value {value} out of range {spec.low}-{spec.high} in NCRONTAB expression {expr!r}")
    return value


def _parse_field(text: str, spec: _FieldSpec, expr: str) -> tuple[int, ...]:
    """Expand one field into the sorted tuple of values it allows."""
    values: set[int] = set()
    for part in text.split(","):
        if not part:
            raise ValueError(f"empty list item in {spec.label} field {text!r} of {expr!r}")
        base, slash, step_text = part.partition("/")
        step = 1
        if slash:
            if not step_text.isdigit() or int(step_text) < 1:
                raise ValueError(f"invalid step {step_text!r} in {spec.label} field {text!r} of {expr!r}")
            step = int(step_text)
        if base == "*":
            first, last = spec.low, spec.high
        elif "-" in base:
            first_text, _, last_text = base.partition("-")
            first = _parse_value(first_text, spec, expr)
            last = _parse_value(last_text, spec, expr)
            if first > last:
                raise ValueError(
                    f"reversed range {base!r} in {spec.label} field of {expr!r} "
                    f"(NCrontab would read it as {last}-{first}, not as a wrap-around)"
                )
        else:
            first = _parse_value(base, spec, expr)
            last = spec.high if slash else first
        values.update(range(first, last + 1, step))
    return tuple(sorted(values))


class CronSchedule:
    """A parsed six-field NCRONTAB expression."""

    def __init__(self, expression: str):
        if not isinstance(expression, str):
            raise ValueError(f"NCRONTAB expression must be a string, got {type(expression).__name__}")
        fields = expression.split()
        if len(fields) != 6:
            hint = f" (a 5-field Unix cron? prefix the seconds field: '0 {expression.strip()}')" if len(fields) == 5 else ""
            raise ValueError(
                f"NCRONTAB expression {expression!r} must have 6 fields "
                f"'{{second}} {{minute}} {{hour}} {{day}} {{month}} {{day-of-week}}', "
                f"got {len(fields)}{hint}"
            )
        self.expression = " ".join(fields)
        parsed = [_parse_field(text, spec, expression) for text, spec in zip(fields, _FIELDS, strict=False)]
        (self.seconds, self.minutes, self.hours, self.days, self.months, dows) = parsed
        self.days_of_week = frozenset(dows)
        if self.next_after(datetime(2000, 1, 1)) is None:
            raise ValueError(f"NCRONTAB expression {expression!r} never occurs")

    def __repr__(self) -> str:
        return f"CronSchedule({self.expression!r})"

    def __str__(self) -> str:
        return self.expression

    def _matches_date(self, day: date) -> bool:
        return (day.weekday() + 1) % 7 in self.days_of_week  # cron: 0 = Sunday

    def _first_time_from(self, hour: int, minute: int, second: int) -> tuple[int, int, int] | None:
        """The earliest allowed (h, m, s) >= the given time of day, or None."""
        for h in self.hours[bisect.bisect_left(self.hours, hour) :]:
            if h > hour:
                return h, self.minutes[0], self.seconds[0]
            for m in self.minutes[bisect.bisect_left(self.minutes, minute) :]:
                if m > minute:
                    return h, m, self.seconds[0]
                i = bisect.bisect_left(self.seconds, second)
                if i < len(self.seconds):
                    return h, m, self.seconds[i]
        return None

    def next_after(self, after: datetime) -> datetime | None:
        """First occurrence strictly after the naive UTC datetime ``after``; None if never."""
        start = after.replace(microsecond=0) + timedelta(seconds=1)
        for year in range(start.year, min(start.year + _SEARCH_YEARS, 10000)):
            for month in self.months:
                if (year, month) < (start.year, start.month):
                    continue
                last_day = calendar.monthrange(year, month)[1]
                for day_of_month in self.days:
                    if day_of_month > last_day:
                        break
                    day = date(year, month, day_of_month)
                    if day < start.date() or not self._matches_date(day):
                        continue
                    if day == start.date():
                        found = self._first_time_from(start.hour, start.minute, start.second)
                        if found is None:
                            continue
                    else:
                        found = (self.hours[0], self.minutes[0], self.seconds[0])
                    return datetime(year, month, day_of_month, *found)
        return None


@dataclass(frozen=True)
class IntervalSchedule:
    """A TimeSpan schedule: run every ``interval``, the first run one interval after start."""

    interval: timedelta
    expression: str

    def __str__(self) -> str:
        return self.expression

    def next_after(self, after: datetime) -> datetime:
        return after + self.interval


Schedule = CronSchedule | IntervalSchedule


def parse_timespan(text: str) -> IntervalSchedule | None:
    """Parse a ``[d.]hh:mm[:ss]`` TimeSpan; None if ``text`` is not TimeSpan-shaped."""
    match = _TIMESPAN_RE.match(text.strip())
    if not match:
        return None
    days, hours, minutes, seconds = (int(g) if g else 0 for g in match.groups())
    if hours > 23 or minutes > 59 or seconds > 59:
        raise ValueError(f"invalid TimeSpan schedule {text!r}")
    interval = timedelta(days=days, hours=hours, minutes=minutes, seconds=seconds)
    if interval <= timedelta(0):
        raise ValueError(f"TimeSpan schedule {text!r} must be longer than zero")
    return IntervalSchedule(interval, text.strip())


@functools.lru_cache(maxsize=256)
def parse_cron(expression: str) -> CronSchedule:
    """Parse (and cache) a six-field NCRONTAB expression; ValueError when invalid."""
    return CronSchedule(expression)


def parse_schedule(text: str) -> Schedule:
    """Parse a timer schedule: a TimeSpan ``hh:mm:ss`` or a six-field NCRONTAB expression."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"empty timer schedule {text!r}")
    return parse_timespan(text) or parse_cron(text.strip())


def next_occurrence(expr: str, after: datetime) -> datetime:
    """The first occurrence of schedule ``expr`` strictly after ``after`` (UTC).

    ``expr`` is a six-field NCRONTAB expression (or a TimeSpan, which yields ``after`` plus the
    interval). Raises ValueError for invalid expressions.
    """
    schedule = parse_schedule(expr)
    aware = after.tzinfo is not None
    naive_utc = after.astimezone(UTC).replace(tzinfo=None) if aware else after
    result = schedule.next_after(naive_utc)
    if result is None:  # pragma: no cover - CronSchedule() already rejects never-occurring crons
        raise ValueError(f"schedule {expr!r} has no occurrence after {after.isoformat()}")
    return result.replace(tzinfo=UTC) if aware else result
