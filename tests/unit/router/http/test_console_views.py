"""The Spend page's rows and top keys from billing's report rows; a replica's load as the Models page shows it;
the Audit page's rows from both logs."""

from __future__ import annotations

from datetime import UTC, datetime

from services.router.http.console.views import audit, billing_event, last_use, replica_load, router_event, spend
from services.router.ports import LoadReport
from services.router.registry import AuditEvent


def row(bucket: str, tenant: str, key: str, requests: int, micros: int, anomalous: bool = False) -> dict[str, object]:
    return {"bucket_start": bucket, "group": {"tenant": tenant, "api_key": key}, "requests": str(requests),
            "prompt_tokens": str(10 * requests), "completion_tokens": str(5 * requests),
            "cost": {"currency_code": "USD", "micros": str(micros)}, "anomalous": anomalous}


def test_rows_add_up_per_bucket_and_tenant_and_keys_rank_by_cost_over_the_window() -> None:
    h1, h2 = "2026-01-01T10:00:00Z", "2026-01-01T11:00:00Z"
    report = {"rows": [row(h1, "acme", "k1", 2, 300), row(h1, "acme", "k2", 1, 100), row(h2, "acme", "k2", 4, 900,
                                                                                          anomalous=True),
                       row(h2, "beta", "k3", 1, 50)]}
    rows, top = spend(report, "tenant", top=2)
    assert [(r["bucket"], r["group"], r["requests"], r["cost"], r["anomalous"]) for r in rows] == [
        ("2026-01-01 10:00:00", "acme", 3, "0.000400", False), ("2026-01-01 11:00:00", "acme", 4, "0.000900", True),
        ("2026-01-01 11:00:00", "beta", 1, "0.000050", False)]
    assert [(k["group"], k["requests"], k["prompt_tokens"], k["cost"], k["anomalous"]) for k in top] == [
        ("k2", 5, 50, "0.001000", True), ("k1", 2, 20, "0.000300", False)]


def test_a_keys_last_use_is_its_latest_hour_with_usage() -> None:
    report = {"rows": [row("2026-01-01T10:00:00Z", "acme", "k1", 1, 1), row("2026-01-01T12:00:00Z", "acme", "k1", 1, 1),
                       row("2026-01-01T11:00:00Z", "acme", "k2", 1, 1)]}
    assert last_use(report) == {"k1": "2026-01-01 12:00:00", "k2": "2026-01-01 11:00:00"}


def test_a_replicas_load_shows_queue_kv_use_of_its_budget_and_tokens_per_second() -> None:
    report = LoadReport("r0", queue_depth=2, active_sequences=3, ready=True, queue_capacity=64,
                        kv_cache_bytes=3 * 2**20 // 2, kv_budget_bytes=512 * 2**20, tokens_per_second=41.26)
    shown = replica_load((report, 0.42))
    assert (shown["queue_depth"], shown["queue_capacity"], shown["active_sequences"], shown["ready"]) == (2, 64, 3, True)
    assert (shown["kv_used"], shown["tokens_per_second"], shown["age_s"]) == ("1.5 / 512 MiB", 41.3, 0.4)
    assert replica_load(None) == {"reported": False}


def test_both_logs_events_land_on_one_timeline_to_the_microsecond_with_their_source() -> None:
    router = router_event(AuditEvent(datetime(2026, 1, 1, 10, 0, 0, 123457, tzinfo=UTC), "console", "model.split",
                                     "model/m", {"weights": {"v1": 900}}, sequence=41))
    billing = billing_event({"audit_id": "7", "time": "2026-01-01T10:00:00.123456Z", "actor": "operator-token",
                             "action": "budget.update", "target": "budget/b1", "details_json": '{"new": {"a": 1}}'})
    assert (router.source, router.sequence, router.time_us) == ("router", 41, 1767261600123457)
    assert (billing.source, billing.sequence, billing.time_us) == ("billing", 7, 1767261600123456)
    assert billing.details == {"new": {"a": 1}}
    assert audit(billing) == {"time": "2026-01-01 10:00:00", "time_us": 1767261600123456, "source": "billing",
                              "sequence": 7, "actor": "operator-token", "action": "budget.update", "target": "budget/b1",
                              "details": {"new": {"a": 1}}}
    assert billing_event({"audit_id": "8", "time": "2026-01-01T10:00:00Z", "details_json": "not json"}).details == {}
