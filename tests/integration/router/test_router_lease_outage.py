"""Billing down with `billing_leases` on: requests within the router's lease on a hard budget are served;
once that lease is used up the budget's requests are refused with UNAVAILABLE naming the budget (never
served unbilled); after billing returns the ledger holds exactly the requests served (none missing, none
doubled), their usage having come over the batched StreamUsage stream with their lease ids."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import grpc
from prometheus_client import REGISTRY

from autoglm.router.v1 import router_service_pb2 as pb2
from services.billing.config import BillingConfig
from services.billing.server import build_server as build_billing
from services.common.config import ServerSettings
from services.inference.engine.model import LoadedModel
from services.router.config import RouterConfig
from services.router.server import build_server as build_router
from tests.integration.router.conftest import ADMIN_TOKEN, EPHEMERAL, start_mesh
from tests.integration.router.test_router_leases import REQUEST, _budget, _ledger
from tests.integration.router.test_router_vertical import bearer, settled_rows
from tests.waiting import wait_until


async def test_billing_down_serves_within_leases_then_refuses_precisely_and_bills_exactly(
        serve, tmp_path: Path, loaded_model: LoadedModel) -> None:
    mesh = await start_mesh(serve, tmp_path, loaded_model, billing_leases=True)
    try:
        budget_id = await _budget(mesh, "outage", 41 * 2_000)  # its first lease covers ~20 worst cases
        secret, _ = await mesh.create_key("outage")
        served: list[pb2.CompleteResponse] = []

        async def admitted_by_lease() -> bool:
            before = _ledger(tmp_path, "SELECT COUNT(*) FROM holds")
            served.append(await mesh.router_stub.Complete(REQUEST, metadata=bearer(secret), timeout=60))
            return _ledger(tmp_path, "SELECT COUNT(*) FROM holds") == before

        await wait_until(admitted_by_lease, 60, "a request admitted against the router's lease", interval=0.2)
        before_outage = len(served)
        billing_leased = REGISTRY.get_sample_value("autoglm_billing_budget_leased",
                                                   {"budget_id": budget_id, "tenant": "outage"})
        assert billing_leased is not None and billing_leased > 0  # billing's metrics show the lease's room
        refused_before = REGISTRY.get_sample_value("autoglm_router_budget_admissions_total",
                                                   {"path": "refused_lease"}) or 0
        port = mesh.billing.port
        await mesh.billing.stop(grace=0)
        refused: grpc.aio.AioRpcError | None = None
        for _ in range(200):  # far more than the lease covers
            try:
                served.append(await mesh.router_stub.Complete(REQUEST, metadata=bearer(secret), timeout=60))
            except grpc.aio.AioRpcError as exc:
                refused = exc
                break
        assert refused is not None, "requests were served past the lease while billing was down"
        during_outage = len(served) - before_outage
        assert during_outage >= 1  # the lease served requests with billing down
        assert refused.code() == grpc.StatusCode.UNAVAILABLE
        assert f"lease on hard budget {budget_id}" in refused.details() and "used up" in refused.details()
        # The router's metrics: its lease's room, the refusal, and the events waiting for billing's ack.
        granted = REGISTRY.get_sample_value("autoglm_router_lease_granted", {"budget_id": budget_id})
        consumed = REGISTRY.get_sample_value("autoglm_router_lease_consumed", {"budget_id": budget_id})
        assert granted is not None and consumed is not None and 0 < consumed <= granted
        assert REGISTRY.get_sample_value("autoglm_router_budget_admissions_total",
                                         {"path": "refused_lease"}) == refused_before + 1
        assert (REGISTRY.get_sample_value("autoglm_router_usage_unacked") or 0) >= during_outage
        await serve(build_billing(BillingConfig(server=ServerSettings(port=port), data_dir=tmp_path / "billing")))
        report = await settled_rows(mesh, "outage", len(served))
    finally:
        await mesh.channel.close()
        await mesh.billing_channel.close()
    assert report.total.requests == len(served)  # none missing, none doubled
    assert report.total.cost.micros == sum(r.cost.micros for r in served)
    with sqlite3.connect(tmp_path / "billing" / "billing.sqlite3") as conn:
        ((events,),) = conn.execute("SELECT COUNT(*) FROM events")
        ((used,),) = conn.execute("SELECT SUM(used) FROM leases")
    assert events == len(served)
    assert used == sum(r.cost.micros for r in served[before_outage - 1:])  # each leased one moved to spend


async def test_a_router_restarted_while_billing_is_down_replays_its_leased_usage_with_the_lease_ids(
        serve, tmp_path: Path, loaded_model: LoadedModel) -> None:
    mesh = await start_mesh(serve, tmp_path, loaded_model, billing_leases=True)
    try:
        await _budget(mesh, "restart", 41 * 2_000)
        secret, _ = await mesh.create_key("restart")
        served: list[pb2.CompleteResponse] = []

        async def admitted_by_lease() -> bool:
            before = _ledger(tmp_path, "SELECT COUNT(*) FROM holds")
            served.append(await mesh.router_stub.Complete(REQUEST, metadata=bearer(secret), timeout=60))
            return _ledger(tmp_path, "SELECT COUNT(*) FROM holds") == before

        await wait_until(admitted_by_lease, 60, "a request admitted against the router's lease", interval=0.2)
        first_leased = len(served) - 1
        port = mesh.billing.port
        await mesh.billing.stop(grace=0)
        for _ in range(3):  # within the lease, billing down: their events wait, journaled
            served.append(await mesh.router_stub.Complete(REQUEST, metadata=bearer(secret), timeout=60))
        await mesh.router.stop(grace=1)  # the router goes away before billing acked them
        await serve(build_router(RouterConfig(
            server=EPHEMERAL, inference_targets=(mesh.inference.address,), billing_target=f"127.0.0.1:{port}",
            data_dir=mesh.data_dir, admin_token=ADMIN_TOKEN, billing_leases=True)))
        await serve(build_billing(BillingConfig(server=ServerSettings(port=port), data_dir=tmp_path / "billing")))
        report = await settled_rows(mesh, "restart", len(served))
    finally:
        await mesh.channel.close()
        await mesh.billing_channel.close()
    assert report.total.requests == len(served)
    assert report.total.cost.micros == sum(r.cost.micros for r in served)
    ((used,),) = _ledger(tmp_path, "SELECT SUM(used) FROM leases")
    assert used == sum(r.cost.micros for r in served[first_leased:])  # the replays moved their lease's room
