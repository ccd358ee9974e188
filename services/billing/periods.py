"""Budget periods: calendar days, weeks (Monday to Sunday) and months in a time zone, or rolling N days.

Spend is kept per bucket: a calendar period's bucket is the period itself; a rolling budget keeps one
bucket per local day and its spend is the sum of the last N day buckets (today included), so the window
moves a day at a time. All instants are integer microseconds since the epoch (UTC).
"""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from services.billing.model import Period, PeriodKind
from services.common.errors import InvalidInput

US = 1_000_000


def zone(name: str) -> ZoneInfo:
    try:
        return ZoneInfo(name or "UTC")
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise InvalidInput(f"unknown time zone {name!r}; use an IANA name such as 'Europe/Paris' or 'UTC'",
                           field="budget.period.time_zone") from exc


def _local_midnight(day: date, tz: ZoneInfo) -> int:
    return int(datetime(day.year, day.month, day.day, tzinfo=tz).timestamp()) * US


def _local_date(t_us: int, tz: ZoneInfo) -> date:
    return datetime.fromtimestamp(t_us / US, tz=UTC).astimezone(tz).date()


def _calendar_start(kind: PeriodKind, day: date) -> date:
    if kind == PeriodKind.WEEKLY:
        return day - timedelta(days=day.weekday())
    if kind == PeriodKind.MONTHLY:
        return day.replace(day=1)
    return day


def _step(kind: PeriodKind, start: date, n: int) -> date:
    """The calendar period start `n` periods after (n < 0: before) `start`."""
    if kind == PeriodKind.WEEKLY:
        return start + timedelta(weeks=n)
    if kind == PeriodKind.MONTHLY:
        months = start.year * 12 + start.month - 1 + n
        return date(months // 12, months % 12 + 1, 1)
    return start + timedelta(days=n)


def bucket_start(period: Period, t_us: int) -> int:
    """Start of the bucket that spend at `t_us` is counted in."""
    tz = zone(period.time_zone)
    day = _local_date(t_us, tz)
    if period.kind == PeriodKind.ROLLING_DAYS:
        return _local_midnight(day, tz)
    return _local_midnight(_calendar_start(period.kind, day), tz)


def bounds(period: Period, t_us: int) -> tuple[int, int]:
    """[start, end) of the period in force at `t_us` (for rolling budgets: the N-day window)."""
    tz = zone(period.time_zone)
    day = _local_date(t_us, tz)
    if period.kind == PeriodKind.ROLLING_DAYS:
        first = day - timedelta(days=period.rolling_days - 1)
        return _local_midnight(first, tz), _local_midnight(day + timedelta(days=1), tz)
    start = _calendar_start(period.kind, day)
    return _local_midnight(start, tz), _local_midnight(_step(period.kind, start, 1), tz)


def previous_starts(period: Period, t_us: int, count: int) -> list[int]:
    """Starts of the `count` calendar periods before the one in force at `t_us`, newest first."""
    tz = zone(period.time_zone)
    start = _calendar_start(period.kind, _local_date(t_us, tz))
    return [_local_midnight(_step(period.kind, start, -n), tz) for n in range(1, count + 1)]


def bucket_span(period: Period, t_us: int) -> tuple[int, int]:
    """[start, end) of the bucket that spend at `t_us` is counted in (a local day for rolling budgets)."""
    if period.kind != PeriodKind.ROLLING_DAYS:
        return bounds(period, t_us)
    tz = zone(period.time_zone)
    day = _local_date(t_us, tz)
    return _local_midnight(day, tz), _local_midnight(day + timedelta(days=1), tz)


class BucketCache:
    """`bucket_start` without the time-zone arithmetic for instants inside the bucket last asked for."""

    def __init__(self) -> None:
        self._last: dict[Period, tuple[int, int]] = {}

    def start(self, period: Period, t_us: int) -> int:
        span = self._last.get(period)
        if span is None or not span[0] <= t_us < span[1]:
            span = self._last[period] = bucket_span(period, t_us)
        return span[0]


class BoundsCache:
    """`bounds` without the time-zone arithmetic for instants of the local day last asked for (the bounds of
    a period in force change at a local midnight at the earliest)."""

    def __init__(self) -> None:
        self._last: dict[Period, tuple[int, int, tuple[int, int]]] = {}

    def bounds(self, period: Period, t_us: int) -> tuple[int, int]:
        known = self._last.get(period)
        if known is not None and known[0] <= t_us < known[1]:
            return known[2]
        found = bounds(period, t_us)
        tz = zone(period.time_zone)
        day = _local_date(t_us, tz)
        self._last[period] = (_local_midnight(day, tz), _local_midnight(day + timedelta(days=1), tz), found)
        return found
