"""Alerts with `billing_leases` on: usage admitted against leases and sent in batches over StreamUsage is
committed spend like any other, so a soft budget's alert levels each fire exactly once in the period
under concurrent load (a soft budget alerts, it does not refuse)."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import grpc

from autoglm.billing.v1 import billing_service_pb2 as billing_pb2
from autoglm.common.v1 import money_pb2
from autoglm.router.v1 import router_service_pb2 as pb2
from services.inference.engine.model import LoadedModel
from tests.integration.router.conftest import Mesh, start_mesh
from tests.integration.router.test_router_leases import REQUEST, _budget
from tests.integration.router.test_router_vertical import bearer, settled_rows


async def _soft_budget(mesh: Mesh, tenant: str, micros: int) -> str:
    reply = await mesh.billing_stub.CreateBudget(billing_pb2.CreateBudgetRequest(budget=billing_pb2.Budget(
        scope=billing_pb2.BudgetScope(kind=billing_pb2.SCOPE_KIND_TENANT, tenant_id=tenant),
        period=billing_pb2.BudgetPeriod(kind=billing_pb2.PERIOD_KIND_DAILY),
        amount=money_pb2.Money(currency_code="USD", micros=micros), enforcement=billing_pb2.ENFORCEMENT_SOFT,
    ), actor="test"), timeout=10)
    return reply.budget.budget_id


async def test_each_alert_level_fires_once_from_leased_spend(serve, tmp_path: Path, loaded_model: LoadedModel) -> None:
    mesh = await start_mesh(serve, tmp_path, loaded_model, billing_leases=True)
    try:
        await _budget(mesh, "alerts", 41 * 10_000)  # hard, far from its limit: requests go on its lease
        soft = await _soft_budget(mesh, "alerts", 41 * 20)  # ~20 requests: WARNING, CRITICAL, EMERGENCY
        secret, _ = await mesh.create_key("alerts")

        async def one() -> pb2.CompleteResponse | grpc.StatusCode:
            try:
                return await mesh.router_stub.Complete(REQUEST, metadata=bearer(secret), timeout=120)
            except grpc.aio.AioRpcError as exc:
                return exc.code()

        outcomes: list[pb2.CompleteResponse | grpc.StatusCode] = []
        for _ in range(3):  # waves of concurrent requests: ~3 x the soft budget's limit in all
            outcomes += await asyncio.gather(*[one() for _ in range(20)])
        served = [o for o in outcomes if isinstance(o, pb2.CompleteResponse)]
        report = await settled_rows(mesh, "alerts", len(served))
    finally:
        await mesh.channel.close()
        await mesh.billing_channel.close()
    assert len(served) == len(outcomes)  # a soft budget refuses nothing
    assert report.total.requests == len(served)
    assert report.total.cost.micros > 41 * 20 * 120 // 100  # past the soft budget's EMERGENCY threshold
    with sqlite3.connect(tmp_path / "billing" / "billing.sqlite3") as conn:
        fired = conn.execute("SELECT level, COUNT(*) FROM alerts WHERE budget_id = ? GROUP BY level ORDER BY level",
                             (soft,)).fetchall()
    assert fired == [(1, 1), (2, 1), (3, 1)]  # WARNING, CRITICAL, EMERGENCY: each once in the period
