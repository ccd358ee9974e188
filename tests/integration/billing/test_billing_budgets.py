"""Holds and budgets over real gRPC: concurrent Reserve cannot overshoot (one process, and two processes on
one PostgreSQL), settle / release / expiry, levels and the traffic-class policy of CheckBudget."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest

from autoglm.billing.v1 import billing_service_pb2 as pb2
from autoglm.billing.v1 import billing_service_pb2_grpc as pb2_grpc
from autoglm.common.v1 import generation_pb2
from services.billing.config import BillingConfig
from services.billing.server import build_server
from services.common.config import ServerSettings
from tests.integration.billing.helpers import (
    OPERATOR_TOKEN,
    expected_cost,
    operator,
    price_request,
    tenant_budget,
    usage,
)
from tests.integration.billing.procs import operator_token, start_billing, wait_port

HOLD = expected_cost(100, 100)  # the most one reserved request can cost


def reserve(i: int, tenant: str = "acme", **kw: object) -> pb2.ReserveRequest:
    return pb2.ReserveRequest(tenant_id=tenant, api_key_id="k1", model="smollm2", max_prompt_tokens=100,
                              max_completion_tokens=100, request_id=f"r{i}", **kw)  # type: ignore[arg-type]


async def _try(stub: pb2_grpc.BillingServiceStub, i: int) -> pb2.ReserveResponse | None:
    try:
        return await stub.Reserve(reserve(i), timeout=60)
    except grpc.aio.AioRpcError as err:
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err.details()
        return None


async def _settle_all(stub: pb2_grpc.BillingServiceStub, holds: list[pb2.ReserveResponse]) -> None:
    for n, hold in enumerate(holds):
        await stub.Settle(pb2.SettleRequest(hold_id=hold.hold_id, event=usage(f"u{n}", prompt=90, completion=80)))


async def test_thousand_concurrent_reserves_grant_exactly_what_the_budget_covers(billing) -> None:
    async with operator(billing) as chan:
        stub = pb2_grpc.BillingServiceStub(chan)
        await stub.CreatePrice(price_request())
        created = await stub.CreateBudget(tenant_budget("acme", micros=100 * HOLD))
        results = await asyncio.gather(*(_try(stub, i) for i in range(1000)))
        granted = [r for r in results if r is not None]
        assert len(granted) == 100
        assert all(r.amount.micros == HOLD for r in granted)
        await _settle_all(stub, granted)
        state = (await stub.GetBudget(pb2.GetBudgetRequest(budget_id=created.budget.budget_id))).status
        denied = await stub.ListAuditEvents(pb2.ListAuditEventsRequest(action="spend.denied", page_size=1000))
    assert state.spent_amount.micros == 100 * expected_cost(90, 80) <= 100 * HOLD
    assert state.held_amount.micros == 0
    assert len(denied.events) == 900
    assert "cannot cover this request" in denied.events[0].details_json


async def test_concurrent_settles_folded_into_one_commit_each_get_their_own_answer(billing) -> None:
    async with operator(billing) as chan:
        stub = pb2_grpc.BillingServiceStub(chan)
        await stub.CreatePrice(price_request())
        created = await stub.CreateBudget(tenant_budget("acme", micros=1000 * HOLD))
        holds = [h.hold_id for h in await asyncio.gather(*(stub.Reserve(reserve(i)) for i in range(111)))]
        foreign = (await stub.Reserve(reserve(999, tenant="globex"))).hold_id

        async def settle(hold_id: str, event_id: str, **kw: object) -> pb2.SettleResponse | grpc.StatusCode:
            try:
                return await stub.Settle(pb2.SettleRequest(hold_id=hold_id, event=usage(event_id, prompt=90,
                                                                                        completion=80, **kw)))
            except grpc.aio.AioRpcError as err:
                return err.code()

        answers = await asyncio.gather(
            *(settle(h, f"s{n}") for n, h in enumerate(holds[:100])),
            *(settle(h, f"x{n}", model="unpriced") for n, h in enumerate(holds[100:110])),  # hold stays open
            settle(holds[110], "s7"),  # another settle's event: a duplicate, counted once
            settle(foreign, "f0"),  # a globex hold settled with acme's usage
            settle("no-such-hold", "n0"))
        state = (await stub.GetBudget(pb2.GetBudgetRequest(budget_id=created.budget.budget_id))).status
        recorded = [a for a in answers if isinstance(a, pb2.SettleResponse)]
        assert len(recorded) == 101 and sum(not a.duplicate for a in recorded) == 100
        assert all(a.cost.micros == expected_cost(90, 80) for a in recorded)
        assert answers[100:110] == [grpc.StatusCode.FAILED_PRECONDITION] * 10
        assert answers[111:] == [grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.NOT_FOUND]
        assert state.spent_amount.micros == 100 * expected_cost(90, 80)
        assert state.held_amount.micros == 10 * HOLD  # the unpriced settles' holds, still open
        again = await asyncio.gather(*(settle(h, f"y{n}") for n, h in enumerate(holds[100:110])))
        assert all(isinstance(a, pb2.SettleResponse) and not a.duplicate for a in again)
        state = (await stub.GetBudget(pb2.GetBudgetRequest(budget_id=created.budget.budget_id))).status
    assert state.spent_amount.micros == 110 * expected_cost(90, 80) and state.held_amount.micros == 0


async def test_two_processes_on_one_postgres_cannot_overshoot(postgres, tmp_path: Path, processes) -> None:
    dsn = postgres.create_database()
    first = start_billing(dsn, tmp_path, "a")
    processes.append(first[0])
    address_a = wait_port(*first)  # the first one migrates the schema
    second = start_billing(dsn, tmp_path, "b")
    processes.append(second[0])
    address_b = wait_port(*second)
    token = operator_token(tmp_path)
    async with operator(address_a, token) as chan_a, operator(address_b, token) as chan_b:
        stubs = [pb2_grpc.BillingServiceStub(chan_a), pb2_grpc.BillingServiceStub(chan_b)]
        await stubs[0].CreatePrice(price_request())
        created = await stubs[1].CreateBudget(tenant_budget("acme", micros=100 * HOLD))
        results = await asyncio.gather(*(_try(stubs[i % 2], i) for i in range(1000)))
        granted = [r for r in results if r is not None]
        assert len(granted) == 100
        await _settle_all(stubs[0], granted)
        state = (await stubs[1].GetBudget(pb2.GetBudgetRequest(budget_id=created.budget.budget_id))).status
    assert state.spent_amount.micros == 100 * expected_cost(90, 80)
    assert state.spent_amount.micros <= 100 * HOLD


async def test_release_and_expiry_give_the_hold_back(serve, tmp_path: Path) -> None:
    now = [1_750_000_000 * 1_000_000]
    config = BillingConfig(server=ServerSettings(port=0), database=f"sqlite:///{tmp_path / 'b.db'}",
                           operator_token=OPERATOR_TOKEN)
    running = await serve(build_server(config, clock=lambda: now[0]))
    async with operator(running) as chan:
        stub = pb2_grpc.BillingServiceStub(chan)
        await stub.CreatePrice(price_request())
        await stub.CreateBudget(tenant_budget("acme", micros=HOLD))
        first = await stub.Reserve(reserve(1, ttl_seconds=30))
        with pytest.raises(grpc.aio.AioRpcError) as full:
            await stub.Reserve(reserve(2))
        assert full.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        again = await stub.Reserve(reserve(1))  # same request id: the same hold, nothing new held
        assert again.hold_id == first.hold_id
        assert (await stub.Release(pb2.ReleaseRequest(hold_id=first.hold_id))).released
        assert not (await stub.Release(pb2.ReleaseRequest(hold_id=first.hold_id))).released
        second = await stub.Reserve(reserve(3, ttl_seconds=30))
        now[0] += 31 * 1_000_000  # the caller crashed; the hold expires
        third = await stub.Reserve(reserve(4))
        assert not (await stub.Release(pb2.ReleaseRequest(hold_id=second.hold_id))).released
        with pytest.raises(grpc.aio.AioRpcError) as unknown:
            await stub.Release(pb2.ReleaseRequest(hold_id="nope"))
    assert third.hold_id
    assert unknown.value.code() == grpc.StatusCode.NOT_FOUND


async def test_levels_pause_batch_at_critical_and_all_but_core_at_emergency(billing) -> None:
    classes = {c: generation_pb2.TrafficClass.Value(f"TRAFFIC_CLASS_{c}") for c in ("CORE", "INTERACTIVE", "BATCH")}
    async with operator(billing) as chan:
        stub = pb2_grpc.BillingServiceStub(chan)
        await stub.CreatePrice(price_request())
        await stub.CreateBudget(tenant_budget("acme", tokens=1000))

        async def allowed() -> dict[str, bool]:
            out = {}
            for name, cls in classes.items():
                reply = await stub.CheckBudget(pb2.CheckBudgetRequest(tenant_id="acme", traffic_class=cls))
                out[name] = reply.allowed
            return out

        seen = [await allowed()]
        for n, tokens in enumerate((850, 200, 200)):  # 85 %, 105 %, 125 %
            await stub.RecordUsage(pb2.RecordUsageRequest(event=usage(f"e{n}", prompt=tokens, completion=0)))
            seen.append(await allowed())
        level = (await stub.CheckBudget(pb2.CheckBudgetRequest(tenant_id="acme"))).level
    assert seen[0] == seen[1] == {"CORE": True, "INTERACTIVE": True, "BATCH": True}
    assert seen[2] == {"CORE": True, "INTERACTIVE": True, "BATCH": False}
    assert seen[3] == {"CORE": True, "INTERACTIVE": False, "BATCH": False}
    assert level == pb2.ALERT_LEVEL_EMERGENCY


async def test_soft_budget_alerts_but_never_denies(billing) -> None:
    async with operator(billing) as chan:
        stub = pb2_grpc.BillingServiceStub(chan)
        await stub.CreatePrice(price_request())
        await stub.CreateBudget(tenant_budget("acme", micros=HOLD, enforcement=pb2.ENFORCEMENT_SOFT))
        holds = [await stub.Reserve(reserve(i)) for i in range(3)]
        check = await stub.CheckBudget(pb2.CheckBudgetRequest(tenant_id="acme"))
    assert len({h.hold_id for h in holds}) == 3
    assert check.allowed and check.budgets[0].held_amount.micros == 3 * HOLD
