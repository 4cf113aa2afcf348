"""Timer-trigger schedules as the Azure Functions host understands them, computed by ``croniter``.

Two schedule forms exist for ``@app.timer_trigger(schedule=...)``:

* **NCRONTAB**, six fields: ``{second} {minute} {hour} {day} {month} {day-of-week}``. croniter
  reads them with ``second_at_beginning=True`` and ``day_or=False``: when both *day* and
  *day-of-week* are restricted, NCrontab (the Functions host's library) requires **both**
  (``0 0 0 13 * FRI`` = Friday the 13th), unlike Unix cron, where either suffices.
* **TimeSpan** ``[d.]hh:mm[:ss]``: a fixed interval (App Service plans only in Azure).

What croniter lacks, and this module adds, is only NCRONTAB's own surface:

* exactly six fields (a five-field Unix cron is refused with the fix in the message);
* full month and day names (``Sunday``, ``July``) besides the three-letter ones;
* NCRONTAB's ranges: day of week 0-6 (croniter also takes 7), no Quartz ``?``, and no reversed
  range such as ``22-2`` (croniter wraps it around; NCrontab would silently read ``2-22``), so the
  dev host surfaces the likely mistake instead of guessing.

All times are UTC. ``next_occurrence(expr, after)`` returns the first occurrence strictly after
``after``: a naive ``after`` is taken as UTC and a naive result is returned; an aware ``after``
is converted to UTC and an aware UTC datetime is returned.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from croniter import croniter
from croniter.croniter import CroniterError

__all__ = ["CronSchedule", "IntervalSchedule", "Schedule", "next_occurrence", "parse_cron", "parse_schedule", "parse_timespan"]

_MONTHS = [
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
_DAYS = ["sunday", "monday", "tuesday", "wednesday", "thursday", "friday", "saturday"]
_FULL_NAMES = {name: name[:3] for name in (*_MONTHS, *_DAYS)}
_NAME = re.compile(r"[A-Za-z]+")
_RANGE = re.compile(r"(\d+)-(\d+)")
_TIMESPAN_RE = re.compile(r"^(?:(\d+)\.)?(\d{1,2}):(\d{2})(?::(\d{2}))?$")
_SEARCH_YEARS = 8  # 29 February needs up to 8 years (1900/2100 skip a leap year)


class CronSchedule:
    """A validated six-field NCRONTAB expression."""

    def __init__(self, expression: str):
        if not isinstance(expression, str):
            raise ValueError(f"NCRONTAB expression must be a string, got {type(expression).__name__}")
        fields = expression.split()
        if len(fields) != 6:
            hint = f" (a 5-field Unix cron? prefix the seconds field: '0 {expression.strip()}')" if len(fields) == 5 else ""
            raise ValueError(
                f"NCRONTAB expression {expression!r} must have 6 fields "
                f"'{{second}} {{minute}} {{hour}} {{day}} {{month}} {{day-of-week}}', got {len(fields)}{hint}"
            )
        if "?" in expression:
            raise ValueError(f"NCRONTAB expression {expression!r}: '?' is Quartz syntax, use '*'")
        for field in fields:
            for low, high in _RANGE.findall(field):
                if int(low) > int(high):
                    raise ValueError(f"NCRONTAB expression {expression!r}: reversed range {low}-{high}")
        if any(int(value) > 6 for value in re.findall(r"\d+", fields[5].split("/")[0])):
            raise ValueError(f"NCRONTAB expression {expression!r}: day of week is 0-6 (0 = Sunday)")
        self.expression = " ".join(fields)
        self._croniter_expression = _NAME.sub(lambda m: _FULL_NAMES.get(m.group().lower(), m.group()), self.expression)
        if self.next_after(datetime(2000, 1, 1)) is None:
            raise ValueError(f"NCRONTAB expression {expression!r} never occurs")

    def __repr__(self) -> str:
        return f"CronSchedule({self.expression!r})"

    def __str__(self) -> str:
        return self.expression

    def next_after(self, after: datetime) -> datetime | None:
        """First occurrence strictly after the naive UTC datetime ``after``; None if never."""
        try:
            iterator = croniter(
                self._croniter_expression,
                after,
                day_or=False,
                second_at_beginning=True,
                max_years_between_matches=_SEARCH_YEARS,
            )
            found: datetime = iterator.get_next(datetime)
        except CroniterError as error:
            if "failed to find" in str(error):
                return None
            raise ValueError(f"invalid NCRONTAB expression {self.expression!r}: {error}") from error
        return found


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
