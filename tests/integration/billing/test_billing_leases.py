"""Router leases over real gRPC, on SQLite and PostgreSQL: grants never pass the limit with every other
lease, hold and spend counted; events against a lease move its room to spend exactly; returned and
expired leases give their room back; Reserve counts other routers' leases; two billing processes on one
PostgreSQL never lease the same room twice."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest

from autoglm.billing.v1 import billing_service_pb2 as pb2
from autoglm.billing.v1 import billing_service_pb2_grpc as pb2_grpc
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

HOLD = expected_cost(100, 100)  # the worst case of one request: 100 prompt + 100 completion tokens
LIMIT = 100 * HOLD


def acquire(router: str, consumed: dict[str, int] | None = None, tenant: str = "acme") -> pb2.AcquireLeasesRequest:
    return pb2.AcquireLeasesRequest(router_id=router, tenant_id=tenant, api_key_id="k1", consumed=[
        pb2.LeaseConsumption(lease_id=lease_id, consumed=c) for lease_id, c in (consumed or {}).items()])


def reserve(i: int) -> pb2.ReserveRequest:
    return pb2.ReserveRequest(tenant_id="acme", api_key_id="k1", model="smollm2", max_prompt_tokens=100,
                              max_completion_tokens=100, request_id=f"r{i}")


async def _status(stub: pb2_grpc.BillingServiceStub, budget_id: str) -> pb2.BudgetStatus:
    return (await stub.GetBudget(pb2.GetBudgetRequest(budget_id=budget_id))).status


async def _router(stub: pb2_grpc.BillingServiceStub, name: str, rounds: int) -> int:
    """A router that spends all the room it is leased, in worst-case requests, refreshing `rounds` times."""
    consumed: dict[str, int] = {}
    spent = 0
    lease = None
    for _ in range(rounds):
        reply = await stub.AcquireLeases(acquire(name, consumed), timeout=60)
        (lease,) = reply.leases
        used = consumed.get(lease.lease_id, 0)
        while used + HOLD <= lease.granted:  # admit, then record, request by request
            used += HOLD
            consumed[lease.lease_id] = used
            await stub.RecordUsage(pb2.RecordUsageRequest(event=usage(
                f"{name}-{lease.lease_id}-{used}", prompt=100, completion=100, lease_ids=[lease.lease_id])))
            spent += HOLD
    assert lease is not None
    await stub.ReturnLease(pb2.ReturnLeaseRequest(lease_id=lease.lease_id, router_id=name,
                                                  consumed=consumed.get(lease.lease_id, 0)))
    return spent


async def _reserve_and_settle(stub: pb2_grpc.BillingServiceStub, i: int) -> int:
    try:
        hold = await stub.Reserve(reserve(i), timeout=60)
    except grpc.aio.AioRpcError as err:
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err.details()
        return 0
    await stub.Settle(pb2.SettleRequest(hold_id=hold.hold_id, event=usage(f"held-{i}", prompt=100, completion=100)))
    return HOLD


async def test_concurrent_leases_and_reserves_never_pass_a_hard_limit(billing) -> None:
    async with operator(billing) as chan:
        stub = pb2_grpc.BillingServiceStub(chan)
        await stub.CreatePrice(price_request())
        budget_id = (await stub.CreateBudget(tenant_budget("acme", micros=LIMIT))).budget.budget_id
        spent = await asyncio.gather(*(_router(stub, f"router-{n}", rounds=6) for n in range(12)),
                                     *(_reserve_and_settle(stub, i) for i in range(60)))
        state = await _status(stub, budget_id)
    assert state.spent_amount.micros == sum(spent) <= LIMIT  # every admitted worst case was spent in full
    assert state.held_amount.micros == 0 and state.leased_amount.micros == 0
    assert sum(spent[:12]) > 0 and sum(spent[12:]) > 0  # both paths admitted
    assert state.spent_amount.micros >= LIMIT - 13 * HOLD  # what no lease or hold could use is < one request each


async def test_a_grant_leaves_room_for_spend_holds_other_leases_and_the_edge(billing) -> None:
    async with operator(billing) as chan:
        stub = pb2_grpc.BillingServiceStub(chan)
        await stub.CreatePrice(price_request())
        budget_id = (await stub.CreateBudget(tenant_budget("acme", micros=LIMIT))).budget.budget_id
        (first,) = (await stub.AcquireLeases(acquire("a"))).leases
        assert first.unit == pb2.LEASE_UNIT_MICROS and first.granted == LIMIT // 100  # the floor: 1 %
        await stub.RecordUsage(pb2.RecordUsageRequest(event=usage("e1", prompt=10, completion=5,
                                                                  lease_ids=[first.lease_id])))
        state = await _status(stub, budget_id)
        cost = expected_cost(10, 5)
        assert state.spent_amount.micros == cost
        assert state.leased_amount.micros == first.granted - cost  # the cost moved from the lease to spend
        # An idempotent repeat of the event moves nothing again.
        await stub.RecordUsage(pb2.RecordUsageRequest(event=usage("e1", prompt=10, completion=5,
                                                                  lease_ids=[first.lease_id])))
        assert (await _status(stub, budget_id)).leased_amount.micros == first.granted - cost
        holds = [await stub.Reserve(reserve(i)) for i in range(90)]  # 90 % of the limit held
        (second,) = (await stub.AcquireLeases(acquire("b"))).leases
        state = await _status(stub, budget_id)
    # limit - spent - held - a's room = 9 % - cost: the last 5 % is never leased, so b gets its floor.
    assert second.granted == LIMIT // 100
    assert len(holds) == 90
    assert state.spent_amount.micros + state.held_amount.micros + state.leased_amount.micros <= LIMIT


async def test_near_the_limit_leases_shrink_to_nothing_and_reserve_counts_them(billing) -> None:
    async with operator(billing) as chan:
        stub = pb2_grpc.BillingServiceStub(chan)
        await stub.CreatePrice(price_request())
        budget_id = (await stub.CreateBudget(tenant_budget("acme", micros=LIMIT))).budget.budget_id
        for i in range(94):
            await stub.Reserve(reserve(i))
        (lease,) = (await stub.AcquireLeases(acquire("a"))).leases
        assert lease.granted == LIMIT // 100  # 6 % free, the edge is 5 %: 1 % may still be leased
        (none,) = (await stub.AcquireLeases(acquire("b"))).leases
        assert none.granted == 0  # only the edge is left: b must Reserve per request
        for i in range(94, 99):  # the edge serves per-request holds...
            await stub.Reserve(reserve(i))
        with pytest.raises(grpc.aio.AioRpcError) as full:  # ...but never a's leased room
            await stub.Reserve(reserve(99))
        assert full.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "leased" in (full.value.details() or "")
        assert (await stub.ReturnLease(pb2.ReturnLeaseRequest(lease_id=lease.lease_id, router_id="a",
                                                              consumed=0))).returned
        assert not (await stub.ReturnLease(pb2.ReturnLeaseRequest(lease_id=lease.lease_id, router_id="a",
                                                                  consumed=0))).returned
        await stub.Reserve(reserve(99))  # the returned room is free again
        state = await _status(stub, budget_id)
    assert state.held_amount.micros == LIMIT and state.leased_amount.micros == 0


async def test_a_refresh_grows_with_the_spend_rate_and_never_lowers_the_grant(serve, tmp_path: Path) -> None:
    now = [1_750_000_000 * 1_000_000]
    config = BillingConfig(server=ServerSettings(port=0), database=f"sqlite:///{tmp_path / 'b.db'}",
                           operator_token=OPERATOR_TOKEN, lease_refresh_s=10, lease_ttl_s=30)
    running = await serve(build_server(config, clock=lambda: now[0]))
    async with operator(running) as chan:
        stub = pb2_grpc.BillingServiceStub(chan)
        await stub.CreatePrice(price_request())
        budget_id = (await stub.CreateBudget(tenant_budget("acme", tokens=100_000))).budget.budget_id
        (lease,) = (await stub.AcquireLeases(acquire("a"))).leases
        assert lease.unit == pb2.LEASE_UNIT_TOKENS and lease.granted == 1_000
        now[0] += 1_000_000  # 1 s later the router has consumed its whole 1,000 tokens: 1,000 tokens/s
        (faster,) = (await stub.AcquireLeases(acquire("a", {lease.lease_id: 1_000}))).leases
        assert faster.lease_id == lease.lease_id
        assert faster.granted == 1_000 + 10_000  # 1,000/s x 10 s, capped at 10 % of the limit
        now[0] += 10_000_000  # idle for 10 s: the target falls to the floor, but the grant never shrinks
        (idle,) = (await stub.AcquireLeases(acquire("a", {lease.lease_id: 1_000}))).leases
        assert idle.granted == faster.granted
        assert (await _status(stub, budget_id)).leased_tokens == faster.granted
        now[0] += 31 * 1_000_000  # the router died: its lease expires and stops counting
        state = await _status(stub, budget_id)
        (fresh,) = (await stub.AcquireLeases(acquire("a"))).leases
    assert state.leased_tokens == 0
    assert fresh.lease_id != lease.lease_id and fresh.granted == 1_000


async def test_lease_calls_with_bad_input_name_the_field(billing) -> None:
    async with operator(billing) as chan:
        stub = pb2_grpc.BillingServiceStub(chan)
        with pytest.raises(grpc.aio.AioRpcError) as no_router:
            await stub.AcquireLeases(pb2.AcquireLeasesRequest(tenant_id="acme"))
        with pytest.raises(grpc.aio.AioRpcError) as unknown:
            await stub.ReturnLease(pb2.ReturnLeaseRequest(lease_id="nope", router_id="a"))
        await stub.CreateBudget(tenant_budget("acme", micros=LIMIT))
        (lease,) = (await stub.AcquireLeases(acquire("a"))).leases
        with pytest.raises(grpc.aio.AioRpcError) as foreign:
            await stub.ReturnLease(pb2.ReturnLeaseRequest(lease_id=lease.lease_id, router_id="b"))
        with pytest.raises(grpc.aio.AioRpcError) as negative:
            await stub.AcquireLeases(acquire("a", {lease.lease_id: -1}))
        await stub.CreatePrice(price_request())
        with pytest.raises(grpc.aio.AioRpcError) as too_many:
            await stub.RecordUsage(pb2.RecordUsageRequest(event=usage("e1", lease_ids=[f"l{i}" for i in range(17)])))
        unknown_lease = await stub.RecordUsage(pb2.RecordUsageRequest(event=usage("e2", lease_ids=["nope"])))
    assert negative.value.code() == too_many.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "consumed" in (negative.value.details() or "") and "lease_ids" in (too_many.value.details() or "")
    assert not unknown_lease.duplicate  # recorded; the unknown lease is ignored
    assert no_router.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "router_id" in (no_router.value.details() or "")
    assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
    assert foreign.value.code() == grpc.StatusCode.FAILED_PRECONDITION


async def test_routers_on_two_billing_processes_sharing_postgres_cannot_be_leased_the_same_room(
        postgres, tmp_path: Path, processes) -> None:
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
        budget_id = (await stubs[1].CreateBudget(tenant_budget("acme", micros=LIMIT))).budget.budget_id
        spent = await asyncio.gather(*(_router(stubs[n % 2], f"router-{n}", rounds=6) for n in range(12)),
                                     *(_reserve_and_settle(stubs[i % 2], i) for i in range(60)))
        state = await _status(stubs[0], budget_id)
    assert state.spent_amount.micros == sum(spent) <= LIMIT
    assert state.held_amount.micros == 0 and state.leased_amount.micros == 0
    assert state.spent_amount.micros >= LIMIT - 13 * HOLD


async def test_lease_watch_calls_without_a_router_or_with_a_negative_consumption_name_the_field(billing) -> None:
    async with operator(billing) as chan:
        stub = pb2_grpc.BillingServiceStub(chan)
        with pytest.raises(grpc.aio.AioRpcError) as no_router:
            async for _ in stub.WatchLeases(pb2.WatchLeasesRequest(), timeout=10):
                break
        with pytest.raises(grpc.aio.AioRpcError) as negative:
            await stub.AckLeaseChange(pb2.AckLeaseChangeRequest(router_id="a", revision=1, consumed=[
                pb2.LeaseConsumption(lease_id="l1", consumed=-1)]), timeout=10)
        late = await stub.AckLeaseChange(pb2.AckLeaseChangeRequest(router_id="a", revision=99), timeout=10)
    assert no_router.value.code() == negative.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "router_id" in (no_router.value.details() or "") and "consumed" in (negative.value.details() or "")
    assert late == pb2.AckLeaseChangeResponse()  # an answer nobody waits for is ignored
