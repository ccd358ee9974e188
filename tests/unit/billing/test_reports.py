"""Usage report domain logic over a fake ledger: grouping, time buckets, top-N and the anomaly rules."""

from __future__ import annotations

from typing import Any

import pytest

from services.billing import reports
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
