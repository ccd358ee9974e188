"""RecordUsage and prices over real gRPC, on SQLite and PostgreSQL: costs to the micro-unit, idempotency,
and precise errors for bad input with nothing written."""

from __future__ import annotations

import time

import grpc
import pytest

from autoglm.billing.v1 import billing_service_pb2 as pb2
from autoglm.billing.v1 import billing_service_pb2_grpc as pb2_grpc
from tests.integration.billing.helpers import expected_cost, operator, price_request, usage


async def test_recorded_event_is_priced_and_a_retry_returns_the_first_result(billing) -> None:
    async with operator(billing) as chan:
        stub = pb2_grpc.BillingServiceStub(chan)
        await stub.CreatePrice(price_request())
        first = await stub.RecordUsage(pb2.RecordUsageRequest(event=usage("e1", prompt=1234, completion=567)))
        again = await stub.RecordUsage(pb2.RecordUsageRequest(event=usage("e1", prompt=9999, completion=1)))
        report = await stub.GetUsageReport(pb2.GetUsageReportRequest(
            start_time={"seconds": 0}, end_time={"seconds": int(time.time()) + 60}))
    assert (first.duplicate, first.cost.micros, first.cost.currency_code) == (False, expected_cost(1234, 567), "USD")
    assert (again.duplicate, again.cost.micros) == (True, first.cost.micros)
    assert (report.total.requests, report.total.prompt_tokens, report.total.cost.micros) == (1, 1234, first.cost.micros)


async def test_price_in_force_at_the_event_time_is_used(billing) -> None:
    async with operator(billing) as chan:
        stub = pb2_grpc.BillingServiceStub(chan)
        await stub.CreatePrice(price_request(effective=1_700_000_000, input=1_000_000, output=1_000_000))
        await stub.CreatePrice(price_request(effective=1_700_100_000, input=3_000_000, output=3_000_000))
        old = await stub.RecordUsage(pb2.RecordUsageRequest(event=usage("old", 1_000_000, 0, end=1_700_050_000)))
        new = await stub.RecordUsage(pb2.RecordUsageRequest(event=usage("new", 1_000_000, 0, end=1_700_200_000)))
        listed = await stub.ListPrices(pb2.ListPricesRequest(model="smollm2"))
    assert (old.cost.micros, new.cost.micros) == (1_000_000, 3_000_000)
    assert [p.input_per_million.micros for p in listed.prices] == [1_000_000, 3_000_000]


def _with(event: pb2.UsageEvent, **fields: str) -> pb2.UsageEvent:
    for name, value in fields.items():
        setattr(event, name, value)
    return event


BAD_EVENTS = {
    "negative tokens": (usage("bad1", prompt=-5), grpc.StatusCode.INVALID_ARGUMENT, "cannot be negative"),
    "unpriced model": (usage("bad2", model="gpt-9"), grpc.StatusCode.FAILED_PRECONDITION, "has no price"),
    "empty event id": (usage(""), grpc.StatusCode.INVALID_ARGUMENT, "event_id is required"),
    "far future": (usage("bad3", end=time.time() + 86_400), grpc.StatusCode.INVALID_ARGUMENT, "in the future"),
    "oversized tags": (usage("bad4", tags={"k": "v" * 65}), grpc.StatusCode.INVALID_ARGUMENT, "tag"),
    "too many tags": (usage("bad5", tags={f"k{i}": "v" for i in range(17)}), grpc.StatusCode.INVALID_ARGUMENT,
                      "at most 16"),
    "malformed span id": (_with(usage("bad6"), span_id="xyz"), grpc.StatusCode.INVALID_ARGUMENT,
                          "span_id must be 16 lowercase hex"),
    "all-zero span id": (_with(usage("bad7"), span_id="0" * 16), grpc.StatusCode.INVALID_ARGUMENT, "not all zero"),
}


@pytest.mark.parametrize("case", sorted(BAD_EVENTS))
async def test_bad_event_is_refused_with_an_actionable_message_and_nothing_written(billing, case: str) -> None:
    event, code, words = BAD_EVENTS[case]
    async with operator(billing) as chan:
        stub = pb2_grpc.BillingServiceStub(chan)
        await stub.CreatePrice(price_request())
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.RecordUsage(pb2.RecordUsageRequest(event=event))
        report = await stub.GetUsageReport(pb2.GetUsageReportRequest(
            start_time={"seconds": 0}, end_time={"seconds": int(time.time()) + 10 * 86_400}))
    assert err.value.code() == code
    assert words in err.value.details()
    assert report.total.requests == 0


async def test_unknown_budget_scope_is_invalid_argument(billing) -> None:
    async with operator(billing) as chan:
        stub = pb2_grpc.BillingServiceStub(chan)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.CreateBudget(pb2.CreateBudgetRequest(budget=pb2.Budget(
                period=pb2.BudgetPeriod(kind=pb2.PERIOD_KIND_DAILY), amount={"currency_code": "USD", "micros": 5})))
        listed = await stub.ListBudgets(pb2.ListBudgetsRequest())
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "scope.kind is required" in err.value.details()
    assert len(listed.budgets) == 0


async def test_stream_acks_every_event_after_commit_and_rejects_bad_ones_alone(billing) -> None:
    async with operator(billing) as chan:
        stub = pb2_grpc.BillingServiceStub(chan)
        await stub.CreatePrice(price_request())
        events = [usage(f"s{i}", prompt=i, completion=2 * i) for i in range(200)]
        events.insert(50, usage("neg", prompt=-1))
        events.append(usage("s7", prompt=7, completion=14))
        acks = [ack async for ack in stub.StreamUsage(pb2.StreamUsageRequest(event=e) for e in events)]
        report = await stub.GetUsageReport(pb2.GetUsageReportRequest(
            start_time={"seconds": 0}, end_time={"seconds": int(time.time()) + 60}))
    assert [a.event_id for a in acks] == [e.event_id for e in events]
    bad = [a for a in acks if a.error_code]
    assert [(a.event_id, a.error_code) for a in bad] == [("neg", "INVALID_ARGUMENT")]
    assert acks[-1].duplicate and not acks[7].duplicate
    assert report.total.requests == 200
    assert report.total.cost.micros == sum(expected_cost(i, 2 * i) for i in range(200))


async def test_batched_stream_messages_get_one_ack_per_event_in_order(billing) -> None:
    async with operator(billing) as chan:
        stub = pb2_grpc.BillingServiceStub(chan)
        await stub.CreatePrice(price_request())
        events = [usage(f"b{i}", prompt=i, completion=1) for i in range(300)]
        requests = [pb2.StreamUsageRequest(events=[*events[:120], usage("b3", prompt=99), usage("bad", model="x")]),
                    pb2.StreamUsageRequest(event=events[120]),  # a single event between two batches
                    pb2.StreamUsageRequest(events=[*events[121:], events[0]])]
        replies = [r async for r in stub.StreamUsage(iter(requests))]
        report = await stub.GetUsageReport(pb2.GetUsageReportRequest(
            start_time={"seconds": 0}, end_time={"seconds": int(time.time()) + 60}))
    assert [len(r.acks) for r in replies] == [122, 0, 180]
    assert replies[1].event_id == "b120" and not replies[1].duplicate
    first, last = replies[0].acks, replies[2].acks
    assert [a.event_id for a in first] == [f"b{i}" for i in range(120)] + ["b3", "bad"]
    assert first[120].duplicate and first[120].cost.micros == first[3].cost.micros == expected_cost(3, 1)
    assert (first[121].error_code, "has no price" in first[121].error_message) == ("FAILED_PRECONDITION", True)
    assert last[-1].duplicate and not any(a.duplicate for a in last[:-1])
    assert report.total.requests == 300
    assert report.total.prompt_tokens == sum(range(300))
