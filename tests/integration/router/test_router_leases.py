"""With `billing_leases` on, the router admits requests against its billing leases: after the first
request of a caller (a per-request Reserve while its leases are fetched), requests take no hold at all,
every usage event names its lease and is recorded once, and the lease's recorded use equals their cost;
against a hard budget concurrent requests never spend past it."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import grpc

from autoglm.billing.v1 import billing_service_pb2 as billing_pb2
from autoglm.common.v1 import generation_pb2, money_pb2
from autoglm.router.v1 import router_service_pb2 as pb2
from services.inference.engine.model import LoadedModel
from tests.integration.router.conftest import MODEL, Mesh, start_mesh
from tests.integration.router.test_router_vertical import bearer, settled_rows
from tests.waiting import wait_until

REQUEST = pb2.CompleteRequest(
    model=MODEL, messages=[generation_pb2.ChatMessage(role=generation_pb2.CHAT_ROLE_USER, content="Say hi.")],
    cache_policy=pb2.CACHE_POLICY_BYPASS, sampling=generation_pb2.SamplingParams(temperature=0.0, max_tokens=4))


async def _budget(mesh: Mesh, tenant: str, micros: int) -> str:
    reply = await mesh.billing_stub.CreateBudget(billing_pb2.CreateBudgetRequest(budget=billing_pb2.Budget(
        scope=billing_pb2.BudgetScope(kind=billing_pb2.SCOPE_KIND_TENANT, tenant_id=tenant),
        period=billing_pb2.BudgetPeriod(kind=billing_pb2.PERIOD_KIND_DAILY),
        amount=money_pb2.Money(currency_code="USD", micros=micros), enforcement=billing_pb2.ENFORCEMENT_HARD,
    ), actor="test"), timeout=10)
    return reply.budget.budget_id


def _ledger(tmp_path: Path, sql: str) -> list[tuple[object, ...]]:
    with sqlite3.connect(tmp_path / "billing" / "billing.sqlite3") as conn:
        return list(conn.execute(sql))


async def test_requests_within_leases_take_no_hold_and_move_their_cost_to_spend(
        serve, tmp_path: Path, loaded_model: LoadedModel) -> None:
    mesh = await start_mesh(serve, tmp_path, loaded_model, billing_leases=True)
    try:
        await _budget(mesh, "leased", 10_000_000)  # room for ~200,000 of these requests
        secret, _ = await mesh.create_key("leased")
        warm: list[pb2.CompleteResponse] = []

        async def admitted_by_lease() -> bool:
            # The first requests take holds while the router fetches the caller's lease and the prices.
            before = _ledger(tmp_path, "SELECT COUNT(*) FROM holds")
            warm.append(await mesh.router_stub.Complete(REQUEST, metadata=bearer(secret), timeout=60))
            return _ledger(tmp_path, "SELECT COUNT(*) FROM holds") == before

        await wait_until(admitted_by_lease, 60, "a request admitted against the router's lease", interval=0.2)
        holds = _ledger(tmp_path, "SELECT COUNT(*) FROM holds")
        replies = await asyncio.gather(*[mesh.router_stub.Complete(REQUEST, metadata=bearer(secret), timeout=120)
                                         for _ in range(20)])
        report = await settled_rows(mesh, "leased", len(warm) + 20)
    finally:
        await mesh.channel.close()
        await mesh.billing_channel.close()
    assert _ledger(tmp_path, "SELECT COUNT(*) FROM holds") == holds  # no billing hold for any of the 20
    assert report.total.requests == len(warm) + 20
    assert report.total.cost.micros == sum(r.cost.micros for r in warm + replies)
    ((used,),) = _ledger(tmp_path, "SELECT SUM(used) FROM leases")
    assert used == warm[-1].cost.micros + sum(r.cost.micros for r in replies)  # each moved its cost to spend


async def test_leases_and_reserves_never_spend_past_a_hard_budget(
        serve, tmp_path: Path, loaded_model: LoadedModel) -> None:
    mesh = await start_mesh(serve, tmp_path, loaded_model, billing_leases=True)
    try:
        budget = 150 * 41  # about 150 requests' worst case: leases cover some, Reserve the edge
        await _budget(mesh, "edge", budget)
        secret, _ = await mesh.create_key("edge")
        await mesh.router_stub.Complete(REQUEST, metadata=bearer(secret), timeout=60)

        async def one() -> pb2.CompleteResponse | grpc.StatusCode:
            try:
                return await mesh.router_stub.Complete(REQUEST, metadata=bearer(secret), timeout=300)
            except grpc.aio.AioRpcError as exc:
                return exc.code()

        outcomes = []
        for _ in range(3):  # waves (within the replica's queue), so the leases are refreshed between them
            outcomes += await asyncio.gather(*[one() for _ in range(100)])
        served = [o for o in outcomes if isinstance(o, pb2.CompleteResponse)]
        report = await settled_rows(mesh, "edge", len(served) + 1)
    finally:
        await mesh.channel.close()
        await mesh.billing_channel.close()
    assert {o for o in outcomes if not isinstance(o, pb2.CompleteResponse)} <= {grpc.StatusCode.RESOURCE_EXHAUSTED}
    assert report.total.requests == len(served) + 1
    assert report.total.cost.micros <= budget
    assert report.total.cost.micros >= budget * 80 // 100
