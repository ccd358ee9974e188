"""Usage report domain logic over a fake ledger: grouping, time buckets, top-N and the anomaly rules."""

from __future__ import annotations

from typing import Any

import pytest

from services.billing import reports, rollups
from services.billing.model import UsageEvent
from services.common.errors import InvalidInput
from services.common.usage import UsageStatus
from tests.unit.billing.fakes import T0, US, Ledger

HOUR = 3600 * US
RULE = reports.AnomalyRule(max_requests=50, window_s=10, hourly_factor_permille=3000)


def add(ledger: Ledger, event_id: str, tokens: int, at: int, key: str = "k1", model: str = "m",
        status: UsageStatus = UsageStatus.COMPLETED, tags: dict[str, str] | None = None) -> None:
    event = UsageEvent(event_id, "acme", key, model, tags=tags or {}, prompt_tokens=tokens, end_us=at, status=status)
    ledger.ingester.ingest(ledger.tx, [event], at)


def query(start: int = T0, end: int = T0 + 48 * HOUR, **kw: Any) -> reports.ReportQuery:
    return reports.ReportQuery(start_us=start, end_us=end, **kw)


def test_grouping_by_key_and_status_sums_requests_tokens_and_cost() -> None:
    ledger = Ledger()
    add(ledger, "1", 100, T0 + 1, key="a")
    add(ledger, "2", 200, T0 + 2, key="a", status=UsageStatus.CANCELLED)
    add(ledger, "3", 400, T0 + 3, key="b")
    add(ledger, "late", 800, T0 + 48 * HOUR, key="b")  # [start, end): outside
    rows, total = reports.build(ledger.tx, query(group_by=("api_key", "status")), RULE)
    assert [(r.group, r.requests, r.prompt_tokens, r.cost_micros) for r in rows] == [
        ({"api_key": "a", "status": "cancelled"}, 1, 200, 200),
        ({"api_key": "a", "status": "completed"}, 1, 100, 100),
        ({"api_key": "b", "status": "completed"}, 1, 400, 400)]
    assert (total.requests, total.cost_micros) == (3, 700)


def test_tag_grouping_and_hourly_buckets() -> None:
    ledger = Ledger()
    add(ledger, "1", 10, T0 + 5 * US, tags={"team": "search"})
    add(ledger, "2", 20, T0 + HOUR + 5 * US, tags={"team": "search"})
    add(ledger, "3", 40, T0 + HOUR + 6 * US, tags={"team": "ads"})
    add(ledger, "4", 80, T0 + HOUR + 7 * US)
    rows, _ = reports.build(ledger.tx, query(group_by=("tag",), tag_key="team", granularity="hour"), RULE)
    assert [(r.bucket_start_us - T0, r.group["tag"], r.prompt_tokens) for r in rows] == [
        (0, "search", 10), (HOUR, "", 80), (HOUR, "ads", 40), (HOUR, "search", 20)]


def test_month_granularity_starts_buckets_on_the_first() -> None:
    ledger = Ledger()
    add(ledger, "jan", 1, T0 + 10 * 24 * HOUR)
    add(ledger, "feb", 2, T0 + 40 * 24 * HOUR)
    rows, _ = reports.build(ledger.tx, query(end=T0 + 60 * 24 * HOUR, granularity="month"), RULE)
    assert [(r.bucket_start_us, r.prompt_tokens) for r in rows] == [(T0, 1), (T0 + 31 * 24 * HOUR, 2)]


def test_top_n_keeps_the_biggest_spenders_and_the_total_covers_them_only() -> None:
    ledger = Ledger()
    for n, (key, tokens) in enumerate((("a", 50), ("b", 500), ("c", 300), ("b", 1), ("d", 10))):
        add(ledger, f"e{n}", tokens, T0 + n, key=key)
    rows, total = reports.build(ledger.tx, query(group_by=("api_key",), top_n=2), RULE)
    assert [(r.group["api_key"], r.cost_micros) for r in rows] == [("b", 501), ("c", 300)]
    assert total.cost_micros == 801


@pytest.mark.parametrize(("requests", "flagged"), [(50, False), (51, True)])
def test_more_than_fifty_requests_in_ten_seconds_is_anomalous(requests: int, flagged: bool) -> None:
    ledger = Ledger()
    for n in range(requests):
        add(ledger, f"burst{n}", 1, T0 + n * (9 * US // requests), key="burst")
    for n in range(200):  # the same count spread out is fine
        add(ledger, f"calm{n}", 1, T0 + n * US, key="calm")
    rows, total = reports.build(ledger.tx, query(group_by=("api_key",)), RULE)
    assert {r.group["api_key"]: r.anomalous for r in rows} == {"burst": flagged, "calm": False}
    assert total.anomalous is flagged


def test_an_hour_far_above_the_keys_own_history_is_anomalous() -> None:
    ledger = Ledger()
    for hour in range(1, 6):  # five hours of history before the window, 100 micro-units an hour
        add(ledger, f"h{hour}", 100, T0 - hour * HOUR, key="steady")
        add(ledger, f"s{hour}", 100, T0 - hour * HOUR, key="spiky")
    add(ledger, "normal", 250, T0 + HOUR, key="steady")  # 2.5x its mean: under the 3x rule
    add(ledger, "spike", 301, T0 + HOUR, key="spiky")  # > 3x
    rows, _ = reports.build(ledger.tx, query(group_by=("api_key",)), RULE)
    assert {r.group["api_key"]: r.anomalous for r in rows} == {"steady": False, "spiky": True}


@pytest.mark.parametrize(("changes", "words"), [({"end": T0}, "after start_time"), ({"group_by": ("colour",)}, "unknown"),
                                                ({"group_by": ("tag",)}, "tag_key"), ({"granularity": "week"}, "week"),
                                                ({"top_n": -1}, "negative")])
def test_bad_queries_say_what_to_fix(changes: dict[str, Any], words: str) -> None:
    with pytest.raises(InvalidInput, match=words):
        reports.check_query(query(**changes))


def random_ledger(seed: int, events: int, hours: int) -> Ledger:
    """Keys with bursts, quiet keys and spiky hours, over `hours` hours around T0 (history before it)."""
    import random

    rng = random.Random(seed)
    ledger = Ledger()
    statuses = (UsageStatus.COMPLETED, UsageStatus.CANCELLED, UsageStatus.FAILED)
    for n in range(events):
        at = T0 - 9 * 24 * HOUR + rng.randrange(0, (hours + 9 * 24) * HOUR)
        add(ledger, f"r{n}", rng.randint(0, 900), at, key=f"k{rng.randint(0, 6)}", model=rng.choice(["m", "m"]),
            status=rng.choice(statuses), tags=rng.choice([{}, {"team": "a"}, {"team": "b", "env": "x"}]))
    for n in range(60):  # a burst across an hour boundary, and one big hour for another key
        add(ledger, f"burst{n}", 1, T0 + 5 * HOUR - 4 * US + n * 100_000, key="k1")
    add(ledger, "spike", 10**6, T0 + 7 * HOUR + 5, key="k2")
    return ledger


@pytest.fixture(scope="module", params=["half rolled up", "all rolled up"])
def busy_ledger(request: pytest.FixtureRequest) -> Ledger:
    """The whole hours come from the rollups and, for the events after their mark, from the events."""
    ledger = random_ledger(3, 2000, 30)
    rollups.roll(ledger.tx, limit=1000 if request.param == "half rolled up" else rollups.ROLL_LIMIT)
    assert rollups.mark(ledger.tx) == (1000 if request.param == "half rolled up" else 2061)
    return ledger


@pytest.mark.parametrize("granularity", ["", "minute", "hour", "day", "month"])
@pytest.mark.parametrize("group_by", [("tenant",), ("model", "tenant"), ("tag",), ("api_key",), ("model_version",),
                                      ("status",), ("api_key", "tag", "status")])
def test_reports_from_rollups_equal_a_scan_of_the_events(busy_ledger: Ledger, group_by: tuple[str, ...],
                                                          granularity: str) -> None:
    ledger = busy_ledger
    memo = reports.BurstMemo()
    windows = [(T0 + 1, T0 + 30 * HOUR - 1), (T0 + 5 * HOUR - 2 * US, T0 + 9 * HOUR + 17), (T0, T0 + 24 * HOUR),
               (T0 + 5 * HOUR + 10, T0 + 5 * HOUR + 20 * US), (T0 + HOUR + 333, T0 + 2 * HOUR + 444)]
    for start, end in windows:
        for top_n in (0, 2):
            q = query(start, end, group_by=group_by, tag_key="team", granularity=granularity, top_n=top_n)
            fast, fast_total = reports.build(ledger.tx, q, RULE)
            slow, slow_total = reports.build(ledger.tx, q, RULE, rollups=False)
            assert fast == slow and fast_total == slow_total, (start - T0, end - T0, top_n)
            remembered = reports.build(ledger.tx, q, RULE, memo=memo), reports.build(ledger.tx, q, RULE, memo=memo)
            assert remembered == ((slow, slow_total), (slow, slow_total))
    flagged = reports.anomalous_keys(ledger.tx, query(T0, T0 + 30 * HOUR), RULE)
    assert {"k1", "k2"} <= flagged


def test_the_burst_rule_reads_events_only_where_the_rollups_allow_a_burst() -> None:
    ledger = Ledger()
    for n in range(51):
        add(ledger, f"b{n}", 1, T0 + 5 * HOUR + n * 1000, key="busy")
    for n in range(40):
        add(ledger, f"q{n}", 1, T0 + n * HOUR // 2, key="quiet")
    seen: list[tuple[int, int]] = []
    original = ledger.tx.all

    def spy(sql: str, params: Any = ()) -> Any:
        if "OVER (PARTITION BY api_key_id" in sql:
            seen.append((params[0], params[1]))
        return original(sql, params)

    ledger.tx.all = spy  # type: ignore[method-assign]
    assert reports.anomalous_keys(ledger.tx, query(T0, T0 + 24 * HOUR), RULE) == {"busy"}
    assert seen == [(T0 + 5 * HOUR, T0 + 6 * HOUR + 10 * US)]  # the hour of its events and one window more


def test_burst_answers_are_remembered_until_a_late_event_changes_the_hour() -> None:
    ledger = Ledger()
    for n in range(51):  # two groups 20 s apart: at most 26 within 10 s
        add(ledger, f"b{n}", 1, T0 + 5 * HOUR + n * 100_000 + (20 * US if n > 25 else 0), key="busy")
    memo = reports.BurstMemo()
    seen: list[int] = []
    original = ledger.tx.all

    def spy(sql: str, params: Any = ()) -> Any:
        if "OVER (PARTITION BY api_key_id" in sql:
            seen.append(params[0])
        return original(sql, params)

    ledger.tx.all = spy  # type: ignore[method-assign]
    q = query(T0, T0 + 24 * HOUR)
    assert reports.anomalous_keys(ledger.tx, q, RULE, memo=memo) == set()
    assert reports.anomalous_keys(ledger.tx, q, RULE, memo=memo) == set()
    assert seen == [T0 + 5 * HOUR]  # read once
    for n in range(25):  # arrive later, between the two groups: 51 within 8 s
        add(ledger, f"late{n}", 1, T0 + 5 * HOUR + 5 * US + n * 100_000, key="busy")
    assert reports.anomalous_keys(ledger.tx, q, RULE, memo=memo) == {"busy"}
    assert reports.anomalous_keys(ledger.tx, q, RULE, memo=memo) == {"busy"}
    assert seen == [T0 + 5 * HOUR] * 2
