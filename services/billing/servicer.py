"""gRPC servicer of billing: thin conversions around the `Billing` facade.

Status codes (through the shared error table): bad input → INVALID_ARGUMENT; an unpriced model, a hold of
another tenant, a price already in force → FAILED_PRECONDITION; unknown budget/price/hold → NOT_FOUND;
a hard budget that cannot cover a hold → RESOURCE_EXHAUSTED with reason BUDGET_EXCEEDED; a lease returned by
another router → FAILED_PRECONDITION, an unknown lease → NOT_FOUND (AcquireLeases never refuses: near the
limit it grants no room). Budgets, prices
(but the read-only ListPrices), reports, alerts and the audit log need an operator (see `operators.py`):
none → UNAUTHENTICATED, a mesh identity that is not an operator → PERMISSION_DENIED.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any, cast

import grpc

from autoglm.billing.v1 import billing_service_pb2 as pb2
from autoglm.billing.v1 import billing_service_pb2_grpc as pb2_grpc
from services.billing import convert
from services.billing.model import EngineRecord, Recorded, UsageEvent
from services.billing.operators import Operator, OperatorAuth
from services.billing.service import Billing
from services.common.error_mapping import status_code_for
from services.common.errors import DomainError
from services.common.price_convert import price_from_proto, price_to_proto
from services.common.tracing import record_child_spans


async def _batches(requests: AsyncIterator[pb2.StreamUsageRequest],
                   limit: int) -> AsyncIterator[list[pb2.StreamUsageRequest]]:
    """Group the requests the client has already sent (up to `limit` events) into one commit, without
    waiting for more: the stream is read ahead while the previous batch commits."""
    queue: asyncio.Queue[pb2.StreamUsageRequest | None] = asyncio.Queue(maxsize=limit * 2)

    async def pump() -> None:
        try:
            async for request in requests:
                await queue.put(request)
        finally:
            await queue.put(None)

    reader = asyncio.create_task(pump())
    try:
        done = False
        while not done:
            first = await queue.get()
            if first is None:
                break
            batch, size = [first], _size(first)
            while size < limit and not queue.empty():
                item = queue.get_nowait()
                if item is None:
                    done = True
                    break
                batch.append(item)
                size += _size(item)
            yield batch
        await reader
    finally:
        reader.cancel()


def _size(request: pb2.StreamUsageRequest) -> int:
    return len(request.events) + 1


def _events(request: pb2.StreamUsageRequest) -> list[pb2.UsageEvent]:
    if not request.events:
        return [request.event]
    return [request.event, *request.events] if request.HasField("event") else list(request.events)


def _ack(event_id: str, outcome: Recorded | DomainError, currency: str) -> pb2.StreamUsageResponse:
    if isinstance(outcome, DomainError):
        return pb2.StreamUsageResponse(event_id=event_id, error_code=status_code_for(outcome).name,
                                       error_message=outcome.message)
    return pb2.StreamUsageResponse(event_id=event_id, duplicate=outcome.duplicate,
                                   cost=convert.money(outcome.cost_micros, currency))


def _rejection(index: int, error: DomainError) -> pb2.EngineUsageRejection:
    return pb2.EngineUsageRejection(index=index, error_code=status_code_for(error).name, error_message=error.message)


class BillingServicer(pb2_grpc.BillingServiceServicer):
    def __init__(self, billing: Billing, operators: OperatorAuth) -> None:
        self.billing = billing
        self.operators = operators
        self.currency = billing.config.currency
        self.max_batch = billing.config.max_batch

    async def RecordUsage(self, request: pb2.RecordUsageRequest, context: grpc.aio.ServicerContext) -> pb2.RecordUsageResponse:
        recorded = await self.billing.record(convert.event(request.event))
        return pb2.RecordUsageResponse(event_id=recorded.event_id, duplicate=recorded.duplicate,
                                       cost=convert.money(recorded.cost_micros, self.currency))

    async def StreamUsage(self, request_iterator: AsyncIterator[pb2.StreamUsageRequest], context: grpc.aio.ServicerContext) -> AsyncIterator[pb2.StreamUsageResponse]:
        async for batch in _batches(request_iterator, self.max_batch):
            messages = [_events(request) for request in batch]
            acks = iter(await self._record([e for events in messages for e in events]))
            for request, events in zip(batch, messages, strict=True):
                if request.events:
                    yield pb2.StreamUsageResponse(acks=[next(acks) for _ in events])
                else:
                    yield next(acks)

    async def _record(self, messages: list[pb2.UsageEvent]) -> list[pb2.StreamUsageResponse]:
        """Acks for a batch of events, in order: converted, recorded in one commit, or refused one by one."""
        outcomes: list[Recorded | DomainError | None] = [None] * len(messages)
        events: list[UsageEvent] = []
        slots: list[int] = []
        for index, message in enumerate(messages):
            try:
                events.append(convert.event(message))
                slots.append(index)
            except DomainError as error:
                outcomes[index] = error
        started_ns = time.time_ns()
        for index, outcome in zip(slots, await self.billing.record_many(events), strict=True):
            outcomes[index] = outcome
        # Each event's span, in the trace of the request it metered (as the child of the router's span).
        record_child_spans("billing.usage", [
            (m.trace_id, m.span_id, {"autoglm.event_id": m.event_id, "autoglm.duplicate": o.duplicate})
            for m, o in zip(messages, outcomes, strict=True)
            if m.trace_id and m.span_id and isinstance(o, Recorded)], started_ns)
        return [_ack(m.event_id, o, self.currency) for m, o in zip(messages, outcomes, strict=True)
                if o is not None]

    async def ReportEngineUsage(self, request: pb2.ReportEngineUsageRequest,
                                context: grpc.aio.ServicerContext) -> pb2.ReportEngineUsageResponse:
        records: list[EngineRecord] = []
        slots: list[int] = []
        rejections: list[pb2.EngineUsageRejection] = []
        for index, message in enumerate(request.records):
            try:
                records.append(convert.engine_record(message, index))
                slots.append(index)
            except DomainError as error:
                rejections.append(_rejection(index, error))
        outcomes = await self.billing.report_engine_usage(records)
        rejections += [_rejection(index, error) for index, error in zip(slots, outcomes, strict=True) if error]
        rejections.sort(key=lambda r: r.index)
        return pb2.ReportEngineUsageResponse(accepted=len(request.records) - len(rejections), rejections=rejections)

    async def Reserve(self, request: pb2.ReserveRequest, context: grpc.aio.ServicerContext) -> pb2.ReserveResponse:
        hold = await self.billing.reserve(convert.reserve_request(request))
        return pb2.ReserveResponse(hold_id=hold.hold_id, amount=convert.money(hold.amount_micros, self.currency),
                                   expire_time=convert.ts(hold.expire_us), level=convert.level_pb(hold.level))

    async def Settle(self, request: pb2.SettleRequest, context: grpc.aio.ServicerContext) -> pb2.SettleResponse:
        recorded = await self.billing.settle(request.hold_id, convert.event(request.event))
        return pb2.SettleResponse(cost=convert.money(recorded.cost_micros, self.currency), duplicate=recorded.duplicate,
                                  level=convert.level_pb(recorded.level))

    async def Release(self, request: pb2.ReleaseRequest, context: grpc.aio.ServicerContext) -> pb2.ReleaseResponse:
        return pb2.ReleaseResponse(released=await self.billing.release(request.hold_id))

    async def AcquireLeases(self, request: pb2.AcquireLeasesRequest, context: grpc.aio.ServicerContext) -> pb2.AcquireLeasesResponse:
        leases = await self.billing.acquire_leases(convert.lease_request(request))
        return pb2.AcquireLeasesResponse(leases=[convert.lease_pb(lease) for lease in leases])

    async def ReturnLease(self, request: pb2.ReturnLeaseRequest, context: grpc.aio.ServicerContext) -> pb2.ReturnLeaseResponse:
        return pb2.ReturnLeaseResponse(returned=await self.billing.return_lease(request.lease_id, request.router_id,
                                                                               request.consumed))

    async def WatchLeases(self, request: pb2.WatchLeasesRequest, context: grpc.aio.ServicerContext) -> AsyncIterator[pb2.WatchLeasesResponse]:
        async for change in self.billing.watch_leases(request.router_id):
            yield convert.lease_change_pb(change)

    async def AckLeaseChange(self, request: pb2.AckLeaseChangeRequest, context: grpc.aio.ServicerContext) -> pb2.AckLeaseChangeResponse:
        self.billing.ack_lease_change(request.router_id, request.revision,
                                      {c.lease_id: c.consumed for c in request.consumed})
        return pb2.AckLeaseChangeResponse()

    async def CheckBudget(self, request: pb2.CheckBudgetRequest, context: grpc.aio.ServicerContext) -> pb2.CheckBudgetResponse:
        verdict = await self.billing.check(request.tenant_id, request.api_key_id, dict(request.tags),
                                           request.traffic_class)
        return pb2.CheckBudgetResponse(allowed=verdict.allowed, level=convert.level_pb(verdict.level), reason=verdict.reason,
                                       budgets=[convert.status_pb(s, self.currency) for s in verdict.states])

    def _operator(self, context: grpc.aio.ServicerContext) -> Operator:
        return self.operators.operator(dict(cast(Any, context.invocation_metadata()) or ()))

    async def CreateBudget(self, request: pb2.CreateBudgetRequest, context: grpc.aio.ServicerContext) -> pb2.CreateBudgetResponse:
        operator = self._operator(context)
        budget, currency = convert.budget(request.budget)
        created = await self.billing.create_budget(budget, operator.actor, currency, claimed=request.actor)
        return pb2.CreateBudgetResponse(budget=convert.budget_pb(created, self.currency))

    async def GetBudget(self, request: pb2.GetBudgetRequest, context: grpc.aio.ServicerContext) -> pb2.GetBudgetResponse:
        self._operator(context)
        state = await self.billing.budget_state(request.budget_id)
        return pb2.GetBudgetResponse(status=convert.status_pb(state, self.currency))

    async def ListBudgets(self, request: pb2.ListBudgetsRequest, context: grpc.aio.ServicerContext) -> pb2.ListBudgetsResponse:
        self._operator(context)
        states = await self.billing.list_budget_states(request.tenant_id)
        return pb2.ListBudgetsResponse(budgets=[convert.status_pb(s, self.currency) for s in states])

    async def UpdateBudget(self, request: pb2.UpdateBudgetRequest, context: grpc.aio.ServicerContext) -> pb2.UpdateBudgetResponse:
        operator = self._operator(context)
        budget, currency = convert.budget(request.budget)
        updated = await self.billing.update_budget(budget, operator.actor, currency, claimed=request.actor)
        return pb2.UpdateBudgetResponse(budget=convert.budget_pb(updated, self.currency))

    async def DeleteBudget(self, request: pb2.DeleteBudgetRequest, context: grpc.aio.ServicerContext) -> pb2.DeleteBudgetResponse:
        operator = self._operator(context)
        await self.billing.delete_budget(request.budget_id, operator.actor, claimed=request.actor)
        return pb2.DeleteBudgetResponse()

    async def CreatePrice(self, request: pb2.CreatePriceRequest, context: grpc.aio.ServicerContext) -> pb2.CreatePriceResponse:
        operator = self._operator(context)
        price = await self.billing.create_price(price_from_proto(request.price), operator.actor, claimed=request.actor)
        return pb2.CreatePriceResponse(price=price_to_proto(price))

    async def ListPrices(self, request: pb2.ListPricesRequest, context: grpc.aio.ServicerContext) -> pb2.ListPricesResponse:
        prices = await self.billing.list_prices(request.model)
        return pb2.ListPricesResponse(prices=[price_to_proto(p) for p in prices])

    async def DeletePrice(self, request: pb2.DeletePriceRequest, context: grpc.aio.ServicerContext) -> pb2.DeletePriceResponse:
        operator = self._operator(context)
        await self.billing.delete_price(request.price_id, operator.actor, claimed=request.actor)
        return pb2.DeletePriceResponse()

    async def WatchAlerts(self, request: pb2.WatchAlertsRequest, context: grpc.aio.ServicerContext) -> AsyncIterator[pb2.WatchAlertsResponse]:
        self._operator(context)
        async for alert in self.billing.watch_alerts(request.cursor, request.tenant_id):
            yield convert.alert_pb(alert)

    async def GetUsageReport(self, request: pb2.GetUsageReportRequest, context: grpc.aio.ServicerContext) -> pb2.GetUsageReportResponse:
        self._operator(context)
        rows, total = await self.billing.report(convert.report_query(request))
        return pb2.GetUsageReportResponse(rows=[convert.report_row_pb(r, self.currency) for r in rows],
                                          total=convert.report_row_pb(total, self.currency))

    async def ListAuditEvents(self, request: pb2.ListAuditEventsRequest, context: grpc.aio.ServicerContext) -> pb2.ListAuditEventsResponse:
        self._operator(context)
        events, token = await self.billing.audit_events(convert.to_us(request.start_time),
                                                        convert.to_us(request.end_time), request.action,
                                                        request.page_size, request.page_token)
        return pb2.ListAuditEventsResponse(events=[convert.audit_pb(e) for e in events], next_page_token=token)
