"""Engine-side metering over a fake ledger: replicas' records reconciled with routers' events by request
id — the router's event wins in either order of arrival, a due record with no router event is billed and
marked as the engine's, duplicates and retries count once, and the grace (or the router's lease) holds it."""

from __future__ import annotations

from services.billing import budgets, engine_usage, leases, reports
from services.billing.engine_usage import BILLED, MATCHED, PENDING, SUPERSEDED
from services.billing.model import EngineRecord, LeaseRequest, ReserveRequest, UsageEvent
from services.common.generation import TrafficClass
from services.common.usage import UsageStatus
from tests.unit.billing.fakes import T0, US, Ledger

GRACE = 30 * US


def record(request_id: str, completion: int = 7, replica: str = "inference-0", router: str = "",
           end: int = T0) -> EngineRecord:
    return EngineRecord(request_id, replica, "acme", "k1", "m", "v1", {"team": "a"}, prompt_tokens=10,
                        completion_tokens=completion, status=UsageStatus.CANCELLED, start_us=end - US, end_us=end,
                        router_id=router)


def router_event(ledger: Ledger, request_id: str, completion: int = 5) -> bool:
    """The router's event for the request; True when the ledger already had one of this id."""
    event = UsageEvent(request_id, "acme", "k1", "m", "v1", prompt_tokens=10, completion_tokens=completion,
                       request_id=request_id, end_us=ledger.now, status=UsageStatus.CANCELLED)
    return ledger.ingester.ingest(ledger.tx, [event], ledger.now).single().duplicate


def ledger_rows(ledger: Ledger) -> list[tuple[str, int, int, int]]:
    """(event id, prompt tokens, completion tokens, source) of every ledger event."""
    return [(str(r[0]), int(r[1]), int(r[2]), int(r[3])) for r in ledger.tx.all(
        "SELECT event_id, prompt_tokens, completion_tokens, source FROM events ORDER BY event_id")]


def states(ledger: Ledger, request_id: str) -> list[int]:
    return [state for _, state in engine_usage.records(ledger.tx, request_id)]


def reconcile(ledger: Ledger, at: int) -> engine_usage.Reconciled:
    return engine_usage.reconcile(ledger.tx, ledger.ingester, at)


def test_a_record_no_router_event_came_for_is_billed_after_the_grace_and_marked_the_engines() -> None:
    ledger = Ledger()
    assert engine_usage.store(ledger.tx, [record("r1")], T0, GRACE) == 1
    assert reconcile(ledger, T0 + GRACE - 1).billed == []  # within the grace: the router may still report
    assert ledger_rows(ledger) == []
    assert reconcile(ledger, T0 + GRACE).billed == ["r1"]
    assert ledger_rows(ledger) == [("r1", 10, 7, 2)]  # the engine's counts, source ENGINE
    assert states(ledger, "r1") == [BILLED]
    assert reconcile(ledger, T0 + 2 * GRACE).requests == 0  # billed once


def test_the_router_event_first_then_the_record_counts_the_routers_event_only() -> None:
    ledger = Ledger()
    assert router_event(ledger, "r1", completion=5) is False
    engine_usage.store(ledger.tx, [record("r1", completion=7)], T0, GRACE)
    assert states(ledger, "r1") == [MATCHED]
    assert reconcile(ledger, T0 + GRACE).billed == []
    assert ledger_rows(ledger) == [("r1", 10, 5, 1)]


def test_the_record_first_then_the_router_event_within_the_grace_counts_the_routers_event_only() -> None:
    ledger = Ledger()
    engine_usage.store(ledger.tx, [record("r1", completion=7)], T0, GRACE)
    assert router_event(ledger, "r1", completion=5) is False
    result = reconcile(ledger, T0 + GRACE)
    assert (result.billed, result.matched) == ([], ["r1"])
    assert states(ledger, "r1") == [MATCHED]
    assert ledger_rows(ledger) == [("r1", 10, 5, 1)]


def test_a_router_event_after_the_engine_bill_is_a_duplicate_and_the_engine_counts_stand() -> None:
    ledger = Ledger()
    engine_usage.store(ledger.tx, [record("r1", completion=7)], T0, GRACE)
    reconcile(ledger, T0 + GRACE)
    assert router_event(ledger, "r1", completion=5) is True  # answered as a duplicate: nothing written
    assert ledger_rows(ledger) == [("r1", 10, 7, 2)]
    assert engine_usage.billed_by_engine(ledger.tx, ["r1", "other"]) == {"r1"}


def test_a_repeated_record_is_kept_once_and_a_retry_on_another_replica_bills_the_longest_once() -> None:
    ledger = Ledger()
    assert engine_usage.store(ledger.tx, [record("r1", 0, "inference-0"), record("r1", 0, "inference-0")],
                              T0, GRACE) == 1
    assert engine_usage.store(ledger.tx, [record("r1", 9, "inference-1")], T0 + US, GRACE) == 1
    assert engine_usage.store(ledger.tx, [record("r1", 9, "inference-1")], T0 + 2 * US, GRACE) == 0
    result = reconcile(ledger, T0 + US + GRACE)
    assert (result.billed, result.superseded) == (["r1"], 1)
    assert ledger_rows(ledger) == [("r1", 10, 9, 2)]
    assert states(ledger, "r1") == [SUPERSEDED, BILLED]


def test_the_grace_counts_from_the_records_arrival_so_a_late_batch_leaves_the_router_time() -> None:
    ledger = Ledger()
    late = T0 + 600 * US  # buffered by the replica while billing was down: it ended long before
    engine_usage.store(ledger.tx, [record("r1", end=T0)], late, GRACE)
    assert reconcile(ledger, T0 + GRACE).billed == []
    assert reconcile(ledger, late + GRACE).billed == ["r1"]


def test_an_open_lease_of_the_router_holds_the_record_until_it_expired_and_the_grace_passed() -> None:
    ledger = Ledger()
    ledger.budget("b1", micros=1_000_000)
    policy = leases.LeasePolicy(ttl_s=60)
    leases.acquire(ledger.tx, ledger.catalog.current(ledger.tx), policy, LeaseRequest("router-a", "acme", "k1", {}),
                   T0)
    engine_usage.store(ledger.tx, [record("r1", router="router-a"), record("r2", router="router-b")], T0, GRACE)
    assert reconcile(ledger, T0 + GRACE).billed == ["r2"]  # router-b holds no lease: the plain grace
    assert reconcile(ledger, T0 + 60 * US + GRACE - 1).billed == []  # router-a's lease had 60 s to run
    assert reconcile(ledger, T0 + 60 * US + GRACE).billed == ["r1"]
    assert states(ledger, "r1") == [BILLED]


def test_an_engine_bill_counts_against_budgets_and_shows_as_engine_in_reports() -> None:
    ledger = Ledger()
    ledger.budget("b1", micros=1_000_000)
    router_event(ledger, "r0", completion=5)
    engine_usage.store(ledger.tx, [record("r1", completion=7)], T0, GRACE)
    reconcile(ledger, T0 + GRACE)
    rows, total = reports.build(ledger.tx, reports.ReportQuery(T0 - US, T0 + 3600 * US, group_by=("source",)),
                                reports.AnomalyRule())
    assert [(r.group, r.requests, r.completion_tokens) for r in rows] == [
        ({"source": "engine"}, 1, 7), ({"source": "router"}, 1, 5)]
    assert total.requests == 2
    spent = ledger.tx.one("SELECT SUM(spent_micros) FROM budget_usage WHERE budget_id = 'b1'")
    assert spent is not None and int(spent[0]) == (10 + 5) + (10 + 7)  # 1 micro-unit a token at the test price


def test_a_record_of_an_unpriced_model_is_rejected_when_due_and_never_retried() -> None:
    ledger = Ledger()
    engine_usage.store(ledger.tx, [EngineRecord("r1", "inference-0", "acme", "k1", "unpriced", end_us=T0)], T0,
                       GRACE)
    result = reconcile(ledger, T0 + GRACE)
    assert [request_id for request_id, _ in result.rejected] == ["r1"]
    assert states(ledger, "r1") == [engine_usage.REJECTED]
    assert reconcile(ledger, T0 + 2 * GRACE).requests == 0
    assert ledger_rows(ledger) == []


def test_settled_records_are_purged_after_the_retention_and_pending_ones_kept() -> None:
    ledger = Ledger()
    engine_usage.store(ledger.tx, [record("r1"), record("r2")], T0, GRACE)
    router_event(ledger, "r1")
    reconcile(ledger, T0 + GRACE)
    engine_usage.store(ledger.tx, [record("r3")], T0 + GRACE, GRACE)
    assert engine_usage.purge(ledger.tx, T0 + GRACE + 1) == 2
    assert states(ledger, "r3") == [PENDING]


def test_a_record_of_a_request_whose_hold_billing_refused_is_never_billed() -> None:
    ledger = Ledger()
    ledger.budget("b1", micros=100)
    snap = ledger.catalog.current(ledger.tx)
    denied = budgets.reserve(ledger.tx, snap, ReserveRequest("acme", "k1", {}, "m", "v1", TrafficClass.INTERACTIVE,
                                                             1_000, 1_000, request_id="r1"), 2_000, T0, 60, "")
    assert isinstance(denied, budgets.Denied)  # the router had started early and cancelled the generation
    engine_usage.store(ledger.tx, [record("r1"), record("r2")], T0, GRACE)
    result = reconcile(ledger, T0 + GRACE)
    assert (result.refused, result.billed) == (["r1"], ["r2"])
    assert states(ledger, "r1") == [engine_usage.REFUSED]
    assert [row[0] for row in ledger_rows(ledger)] == ["r2"]
