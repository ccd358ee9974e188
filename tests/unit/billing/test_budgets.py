"""Budget domain logic over a fake ledger: periods, levels, alerts once per level, auto limits, holds."""

from __future__ import annotations

import random

import pytest

from services.billing import budgets, periods
from services.billing.model import (
    AutoLimit,
    Budget,
    BudgetState,
    Enforcement,
    Hold,
    Period,
    PeriodKind,
    ReserveRequest,
    Scope,
    ScopeKind,
    Thresholds,
    UsageEvent,
)
from services.common.generation import TrafficClass
from services.common.usage import AlertLevel
from tests.unit.billing.fakes import T0, US, Ledger

DAY = 86_400 * US


def state_of(ledger: Ledger, budget_id: str, at: int | None = None) -> BudgetState:
    budget = ledger.catalog.current(ledger.tx).budgets[budget_id]
    at = ledger.now if at is None else at
    return budgets.state(ledger.tx, budget, at, ledger.now)


def request(tokens: int = 100, traffic: TrafficClass = TrafficClass.INTERACTIVE, key: str = "k1") -> ReserveRequest:
    return ReserveRequest("acme", key, {}, "m", "", traffic, tokens, 0)


@pytest.mark.parametrize(("spent", "level"), [(0, AlertLevel.NONE), (799, AlertLevel.NONE), (800, AlertLevel.WARNING),
                                              (999, AlertLevel.WARNING), (1000, AlertLevel.CRITICAL), (1199, AlertLevel.CRITICAL),
                                              (1200, AlertLevel.EMERGENCY)])
def test_level_follows_the_thresholds_of_spend(spent: int, level: AlertLevel) -> None:
    budget = Budget("b", Scope(ScopeKind.TENANT, "acme"), Period(PeriodKind.DAILY), tokens=1000)
    assert BudgetState(budget, 0, 1, 0, spent, 10_000, 0, 0, 1000).level == level  # holds are not spend


def test_custom_thresholds_and_permille() -> None:
    budget = Budget("b", Scope(ScopeKind.TENANT, "acme"), Period(PeriodKind.DAILY), amount_micros=1000,
                    thresholds=Thresholds(50, 90, 150))
    st = BudgetState(budget, 0, 1, 905, 0, 0, 0, 1000, 0)
    assert (st.level, st.permille) == (AlertLevel.CRITICAL, 905)


@pytest.mark.parametrize("with_book", [True, False])
def test_each_level_fires_once_per_period_in_order_and_a_new_period_rearms(with_book: bool) -> None:
    ledger = Ledger(with_book)
    ledger.budget("b", tokens=1000, period=PeriodKind.DAILY)
    raised = []
    for n, tokens in enumerate((500, 350, 100, 100, 250, 10)):  # 50, 85, 95, 105, 130, 131 %
        raised += [a.level for a in ledger.record(f"e{n}", tokens).alerts]
    ledger.now += DAY  # the next day: a new period
    raised += [a.level for a in ledger.record("next", 850).alerts]
    assert raised == [AlertLevel.WARNING, AlertLevel.CRITICAL, AlertLevel.EMERGENCY, AlertLevel.WARNING]
    assert state_of(ledger, "b").spent_tokens == 850


def test_one_batch_crossing_two_levels_raises_both_in_order() -> None:
    ledger = Ledger()
    ledger.budget("b", tokens=1000)
    events = [UsageEvent(f"e{i}", "acme", "k1", "m", prompt_tokens=260, end_us=T0) for i in range(4)]  # 104 %
    ingested = ledger.ingester.ingest(ledger.tx, events, T0)
    assert [a.level for a in ingested.alerts] == [AlertLevel.WARNING, AlertLevel.CRITICAL]
    assert [o.level for o in ingested.outcomes] == [AlertLevel.CRITICAL] * 4  # type: ignore[union-attr]


def test_rolling_budget_counts_only_the_last_n_days() -> None:
    ledger = Ledger()
    ledger.budget("r", tokens=10_000, period=PeriodKind.ROLLING_DAYS, days=3)
    for day in range(5):
        ledger.record(f"d{day}", 100 * (day + 1), at=T0 + day * DAY + 3600 * US)
    ledger.now = T0 + 4 * DAY + 7200 * US
    st = state_of(ledger, "r")
    assert st.spent_tokens == 300 + 400 + 500  # days 2, 3 and 4
    assert (st.period_start_us, st.period_end_us) == (T0 + 2 * DAY, T0 + 5 * DAY)


def test_calendar_week_bucket_and_cache_agree() -> None:
    cache = periods.BucketCache()
    week = Period(PeriodKind.WEEKLY, time_zone="Europe/Paris")
    for t in range(T0 - 10 * DAY, T0 + 10 * DAY, DAY // 3):
        assert cache.start(week, t) == periods.bucket_start(week, t)


def test_auto_budget_is_mean_of_past_periods_times_factor_and_floor_without_history() -> None:
    ledger = Ledger()
    created = T0 - 100 * DAY
    ledger.budget("auto", period=PeriodKind.MONTHLY, create_us=created,
                  auto=AutoLimit(lookback_periods=3, factor_permille=1300, floor_micros=5_000))
    budget = ledger.catalog.current(ledger.tx).budgets["auto"]
    assert budgets.auto_limit(ledger.tx, budget, created + DAY) == (5_000, 0)  # no past period yet
    for month_start, spent in zip(periods.previous_starts(budget.period, T0, 3), (3000, 6000, 9000), strict=True):
        ledger.record(f"m{month_start}", spent, at=month_start + DAY)
    assert budgets.auto_limit(ledger.tx, budget, T0) == ((3000 + 6000 + 9000) * 1300 // 3000,) * 2  # 1 micro-unit a token


def test_auto_budget_ignores_periods_before_it_existed() -> None:
    ledger = Ledger()
    ledger.budget("auto", period=PeriodKind.MONTHLY, create_us=T0 - 40 * DAY,
                  auto=AutoLimit(lookback_periods=3, factor_permille=2000, floor_tokens=10))
    budget = ledger.catalog.current(ledger.tx).budgets["auto"]
    ledger.record("old", 999, at=T0 - 31 * DAY)  # in December
    # created in November: the mean is over November and December (2 periods), not over 3
    assert budgets.auto_limit(ledger.tx, budget, T0)[1] == 999 * 2000 // (1000 * 2)


@pytest.mark.parametrize("with_book", [True, False])
def test_reserve_counts_spend_and_open_holds_and_expired_holds_free_the_budget(with_book: bool) -> None:
    ledger = Ledger(with_book)
    ledger.budget("b", tokens=1000)
    ledger.record("spent", 500)
    snap = ledger.catalog.current(ledger.tx)
    first = budgets.reserve(ledger.tx, snap, request(300), 300, ledger.now, 10, "ops")
    denied = budgets.reserve(ledger.tx, snap, request(300), 300, ledger.now, 10, "ops")
    assert isinstance(first, Hold)
    assert isinstance(denied, budgets.Denied) and "spent 500 + held 300 + leased 0 + requested 300 > limit 1000" in denied.reason
    later = ledger.now + 11 * US  # the first hold expired
    assert not isinstance(budgets.reserve(ledger.tx, snap, request(300), 300, later, 10, "ops"), budgets.Denied)
    assert budgets.close_hold(ledger.tx, snap, first.hold_id, budgets.RELEASED, later) is False  # type: ignore[union-attr]


def test_the_book_counts_exactly_the_open_unexpired_holds_the_tables_count() -> None:
    """Many holds with mixed expiries, settled, released or left to expire, on one clock: after every step
    the writer's book (running totals) and the tables agree on what is held."""
    rng = random.Random(15)
    ledgers = [Ledger(True), Ledger(False)]
    for ledger in ledgers:
        ledger.budget("b", tokens=10**9)
    snaps = [ledger.catalog.current(ledger.tx) for ledger in ledgers]
    now, open_holds = T0, []
    for _ in range(600):
        now += rng.choice((0, 0, US // 2, 3 * US))
        if open_holds and rng.random() < 0.4:
            pair = open_holds.pop(rng.randrange(len(open_holds)))
            how = rng.choice((budgets.SETTLED, budgets.RELEASED))
            closed = {budgets.close_hold(ledger.tx, snap, hold_id, how, now)
                      for ledger, snap, hold_id in zip(ledgers, snaps, pair, strict=True)}
            assert len(closed) == 1
        else:
            tokens, ttl = rng.randrange(1, 500), rng.randrange(1, 30)
            made = [budgets.reserve(ledger.tx, snap, request(tokens), tokens, now, ttl, "ops")
                    for ledger, snap in zip(ledgers, snaps, strict=True)]
            open_holds.append([hold.hold_id for hold in made if isinstance(hold, Hold)])
        with_book, from_tables = (budgets.state(ledger.tx, snap.budgets["b"], now, now)
                                  for ledger, snap in zip(ledgers, snaps, strict=True))
        assert (with_book.held_micros, with_book.held_tokens) == (from_tables.held_micros, from_tables.held_tokens)
    assert from_tables.held_tokens > 0


def test_released_hold_is_available_again() -> None:
    ledger = Ledger()
    ledger.budget("b", tokens=1000)
    snap = ledger.catalog.current(ledger.tx)
    hold = budgets.reserve(ledger.tx, snap, request(1000), 1000, ledger.now, 60, "ops")
    assert isinstance(budgets.reserve(ledger.tx, snap, request(1), 1, ledger.now, 60, "ops"), budgets.Denied)
    assert budgets.close_hold(ledger.tx, snap, hold.hold_id, budgets.RELEASED, ledger.now)  # type: ignore[union-attr]
    assert not isinstance(budgets.reserve(ledger.tx, snap, request(1000), 1000, ledger.now, 60, "ops"),
                          budgets.Denied)


def test_traffic_class_policy_at_critical_and_emergency_only_for_hard_budgets() -> None:
    ledger = Ledger()
    ledger.budget("hard", tokens=1000)
    ledger.budget("soft", tokens=1000, scope=Scope(ScopeKind.API_KEY, "acme", "k2"), enforcement=Enforcement.SOFT)
    ledger.record("a", 1100)  # hard: 110 % (CRITICAL)
    ledger.record("b", 1300, key="k2")  # both: hard 240 %, soft 130 % (EMERGENCY)
    snap = ledger.catalog.current(ledger.tx)

    def allowed(key: str, traffic: TrafficClass) -> bool:
        return budgets.check(ledger.tx, snap, "acme", key, {}, traffic, ledger.now).allowed

    assert not allowed("k1", TrafficClass.INTERACTIVE) and allowed("k1", TrafficClass.CORE)
    soft_only = Ledger()
    soft_only.budget("soft", tokens=1000, enforcement=Enforcement.SOFT)
    soft_only.record("x", 5000)
    verdict = budgets.check(soft_only.tx, soft_only.catalog.current(soft_only.tx), "acme", "k1", {},
                            TrafficClass.BATCH, soft_only.now)
    assert verdict.allowed and verdict.level == AlertLevel.EMERGENCY


def test_tag_and_key_budgets_apply_only_to_matching_events() -> None:
    ledger = Ledger()
    ledger.budget("tag", tokens=10_000, scope=Scope(ScopeKind.TAG, "acme", tag_key="team", tag_value="search"))
    ledger.budget("key", tokens=10_000, scope=Scope(ScopeKind.API_KEY, "acme", "k9"))
    ledger.record("1", 100, tags={"team": "search"})
    ledger.record("2", 200, tags={"team": "ads"})
    ledger.record("3", 400, key="k9")
    assert (state_of(ledger, "tag").spent_tokens, state_of(ledger, "key").spent_tokens) == (100, 400)
