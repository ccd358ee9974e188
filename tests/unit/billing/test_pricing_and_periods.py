"""Cost to the micro-unit (one half-up rounding on the total) and budget periods in time zones."""

from __future__ import annotations

from datetime import datetime
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.billing import periods
from services.billing.model import Period, PeriodKind
from services.common.errors import FailedPrecondition, InvalidInput
from services.common.pricing import Price, PriceTable, cost_micros


def price(inp: int, out: int, cached: int | None = None, at: int = 0, version: str = "") -> Price:
    return Price("p", "m", version, inp, out, cached, at)


def test_rounding_is_half_up_once_on_the_total_not_per_component() -> None:
    # 1 token at 0.5 micro + 1 token at 0.5 micro: per-component rounding would give 2, the total is exactly 1.
    assert cost_micros(price(500_000, 500_000), 1, 1) == 1
    assert cost_micros(price(1_500_000, 0), 1, 0) == 2  # 1.5 → 2
    assert cost_micros(price(1_499_999, 0), 1, 0) == 1  # 1.499999 → 1
    assert cost_micros(price(2_000_000, 6_000_000), 1234, 567) == 5870  # 2468 + 3402


def test_cached_price_applies_to_both_kinds_of_tokens_when_set() -> None:
    assert cost_micros(price(2_000_000, 6_000_000, cached=1_000_000), 1000, 1000, cached=True) == 2000
    assert cost_micros(price(2_000_000, 6_000_000), 1000, 1000, cached=True) == 8000


@given(st.integers(0, 10**8), st.integers(0, 10**8), st.integers(0, 10**9), st.integers(0, 10**9))
def test_cost_equals_exact_rational_rounded_half_up(p: int, c: int, pi: int, po: int) -> None:
    from fractions import Fraction

    exact = Fraction(p * pi + c * po, 1_000_000)
    assert cost_micros(price(pi, po), p, c) == int(exact + Fraction(1, 2))


def test_price_in_force_prefers_the_version_then_the_model_and_respects_time() -> None:
    table = PriceTable([price(1, 1, at=100), price(2, 2, at=200), price(9, 9, at=150, version="v2")])
    assert table.in_force("m", "", 50) is None
    assert table.require("m", "", 199).input_per_million == 1
    assert table.require("m", "v2", 160).input_per_million == 9
    assert table.require("m", "v3", 250).input_per_million == 2
    with pytest.raises(FailedPrecondition, match="autoglm price set"):
        table.require("other", "", 300)


def us(dt: datetime) -> int:
    return int(dt.timestamp()) * 1_000_000


def test_calendar_periods_follow_the_time_zone() -> None:
    paris = ZoneInfo("Europe/Paris")
    t = us(datetime(2026, 3, 29, 1, 30, tzinfo=paris))  # the night clocks go forward
    start, end = periods.bounds(Period(PeriodKind.DAILY, time_zone="Europe/Paris"), t)
    assert (start, end) == (us(datetime(2026, 3, 29, tzinfo=paris)), us(datetime(2026, 3, 30, tzinfo=paris)))
    assert end - start == 23 * 3600 * 1_000_000
    week = periods.bounds(Period(PeriodKind.WEEKLY, time_zone="Europe/Paris"), t)
    assert week[0] == us(datetime(2026, 3, 23, tzinfo=paris))  # Monday
    month = periods.bounds(Period(PeriodKind.MONTHLY, time_zone="America/New_York"),
                           us(datetime(2026, 1, 1, 3, 0, tzinfo=ZoneInfo("UTC"))))
    assert month[0] == us(datetime(2025, 12, 1, tzinfo=ZoneInfo("America/New_York")))


def test_rolling_window_and_previous_periods() -> None:
    utc = ZoneInfo("UTC")
    t = us(datetime(2026, 5, 10, 12, tzinfo=utc))
    assert periods.bounds(Period(PeriodKind.ROLLING_DAYS, rolling_days=7), t) == (
        us(datetime(2026, 5, 4, tzinfo=utc)), us(datetime(2026, 5, 11, tzinfo=utc)))
    assert periods.previous_starts(Period(PeriodKind.MONTHLY), t, 3) == [
        us(datetime(2026, m, 1, tzinfo=utc)) for m in (4, 3, 2)]


def test_unknown_time_zone_is_invalid_input() -> None:
    with pytest.raises(InvalidInput, match="IANA"):
        periods.bounds(Period(PeriodKind.DAILY, time_zone="Mars/Olympus"), 0)


@given(st.lists(st.integers(min_value=1_700_000_000, max_value=1_800_000_000), min_size=1, max_size=40),
       st.sampled_from([Period(PeriodKind.DAILY, 0, "Europe/Paris"), Period(PeriodKind.WEEKLY, 0, "America/New_York"),
                        Period(PeriodKind.MONTHLY, 0, "Australia/Lord_Howe"), Period(PeriodKind.ROLLING_DAYS, 7, "UTC"),
                        Period(PeriodKind.ROLLING_DAYS, 3, "America/Sao_Paulo")]))
def test_the_bounds_cache_answers_what_bounds_computes(seconds: list[int], period: Period) -> None:
    cache = periods.BoundsCache()
    instants = [s * periods.US for s in seconds]
    instants += [t + d for t in instants[:5] for d in (-1, 1, 3600 * periods.US, 86_400 * periods.US)]  # neighbours
    instants += [edge + d for t in instants[:5] for edge in periods.bounds(period, t) for d in (-1, 0, 1)]
    for t in sorted(instants) + instants:
        assert cache.bounds(period, t) == periods.bounds(period, t)
