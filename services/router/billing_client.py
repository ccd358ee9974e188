"""gRPC adapter for billing: holds, leases, settlement, usage records and budget checks."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from autoglm.billing.v1 import billing_service_pb2 as pb2
from autoglm.billing.v1 import billing_service_pb2_grpc as pb2_grpc
from services.common.errors import DomainError, PeerUnreachable
from services.common.generation import TrafficClass
from services.common.peer_errors import Peer, PeerStatus, billing_error, domain_error
from services.common.price_convert import price_from_proto
from services.common.pricing import Price
from services.common.tracing import outgoing_metadata
from services.common.usage import AlertLevel
from services.router.leasebook import BudgetChange, LeaseGrant
from services.router.ports import Hold, HoldRequest, UsageRecord
from services.router.types import Money
from services.router.usage_stream import Ack

# Reconnect quickly after an outage instead of gRPC's default backoff of up to two minutes.
RECONNECT_OPTIONS = (("grpc.initial_reconnect_backoff_ms", 200), ("grpc.max_reconnect_backoff_ms", 2000),
                     ("grpc.min_reconnect_backoff_ms", 200))


_SCOPE_KINDS = {pb2.SCOPE_KIND_TENANT: "tenant", pb2.SCOPE_KIND_API_KEY: "api_key", pb2.SCOPE_KIND_TAG: "tag"}


def usage_to_proto(usage: UsageRecord) -> pb2.UsageEvent:
    start, end = Timestamp(), Timestamp()
    start.FromDatetime(usage.start_time)
    end.FromDatetime(usage.end_time)
    return pb2.UsageEvent(
        event_id=usage.event_id, tenant_id=usage.tenant_id, api_key_id=usage.api_key_id, model=usage.model,
        model_version=usage.model_version, tags=usage.tags, prompt_tokens=usage.prompt_tokens,
        completion_tokens=usage.completion_tokens, cached=usage.cached, request_id=usage.request_id,
        trace_id=usage.trace_id, start_time=start, end_time=end, status=int(usage.status),  # type: ignore[arg-type]
        traffic_class=int(usage.traffic_class),  # type: ignore[arg-type]
        quoted_price_id=usage.quoted_price_id,
        lease_ids=usage.lease_ids, span_id=usage.span_id,
    )


def _ack(ack: pb2.StreamUsageResponse) -> Ack:
    if ack.error_code:
        code = getattr(grpc.StatusCode, ack.error_code, grpc.StatusCode.UNKNOWN)
        error: DomainError = domain_error(Peer.BILLING, PeerStatus(code, ack.error_message))
        return ack.event_id, error
    return ack.event_id, Money(ack.cost.currency_code or "USD", ack.cost.micros)


class GrpcUsageStream:
    """One StreamUsage call: batches of events out, their acks (after billing's commit) back."""

    def __init__(self, call: grpc.aio.StreamStreamCall) -> None:  # type: ignore[type-arg]
        self._call = call

    async def send(self, events: Sequence[UsageRecord]) -> None:
        try:
            await self._call.write(pb2.StreamUsageRequest(events=[usage_to_proto(u) for u in events]))
        except grpc.aio.AioRpcError as exc:
            raise billing_error(exc) from None
        except asyncio.InvalidStateError:  # the call ended: its read reports why
            raise PeerUnreachable("the usage stream to billing ended") from None

    async def receive(self) -> list[Ack] | None:
        try:
            reply = await self._call.read()
        except grpc.aio.AioRpcError as exc:
            raise billing_error(exc) from None
        if reply is grpc.aio.EOF:
            return None
        assert isinstance(reply, pb2.StreamUsageResponse)
        return [_ack(a) for a in reply.acks] if reply.acks else [_ack(reply)]

    async def close(self) -> None:
        self._call.cancel()


class GrpcBilling:
    def __init__(self, target: str, timeout_s: float = 3.0, hold_ttl_s: int = 300) -> None:
        self._channel = grpc.aio.insecure_channel(target, options=RECONNECT_OPTIONS)
        self._stub = pb2_grpc.BillingServiceStub(self._channel)
        self._timeout_s = timeout_s
        self._hold_ttl_s = hold_ttl_s

    async def reserve(self, request: HoldRequest) -> Hold:
        try:
            reply = await self._stub.Reserve(
                pb2.ReserveRequest(
                    tenant_id=request.tenant_id, api_key_id=request.api_key_id, tags=request.tags,
                    model=request.model, model_version=request.model_version,
                    traffic_class=int(request.traffic_class),  # type: ignore[arg-type]
                    max_prompt_tokens=request.max_prompt_tokens, max_completion_tokens=request.max_completion_tokens,
                    ttl_seconds=self._hold_ttl_s, request_id=request.request_id,
                ),
                metadata=outgoing_metadata(), timeout=self._timeout_s,
            )
        except grpc.aio.AioRpcError as exc:
            raise billing_error(exc) from None
        return Hold(hold_id=reply.hold_id, level=AlertLevel(reply.level))

    async def open_usage_stream(self) -> GrpcUsageStream:
        """A long-lived StreamUsage call (no deadline): the router's batched usage events."""
        return GrpcUsageStream(self._stub.StreamUsage(metadata=outgoing_metadata()))

    async def acquire_leases(self, router_id: str, tenant_id: str, api_key_id: str, tags: dict[str, str],
                             consumed: dict[str, int]) -> list[LeaseGrant]:
        try:
            reply = await self._stub.AcquireLeases(
                pb2.AcquireLeasesRequest(router_id=router_id, tenant_id=tenant_id, api_key_id=api_key_id, tags=tags,
                                         consumed=[pb2.LeaseConsumption(lease_id=lease_id, consumed=c)
                                                   for lease_id, c in consumed.items()]),
                metadata=outgoing_metadata(), timeout=self._timeout_s,
            )
        except grpc.aio.AioRpcError as exc:
            raise billing_error(exc) from None
        now = time.time()
        return [LeaseGrant(lease.lease_id, lease.budget_id, lease.unit == pb2.LEASE_UNIT_TOKENS, lease.granted,
                           lease.expire_time.ToMicroseconds() / 1e6 - now, float(lease.refresh_seconds),
                           AlertLevel(lease.level)) for lease in reply.leases]

    async def return_lease(self, router_id: str, lease_id: str, consumed: int) -> bool:
        try:
            reply = await self._stub.ReturnLease(
                pb2.ReturnLeaseRequest(lease_id=lease_id, router_id=router_id, consumed=consumed),
                metadata=outgoing_metadata(), timeout=self._timeout_s)
        except grpc.aio.AioRpcError as exc:
            raise billing_error(exc) from None
        return reply.returned

    async def watch_leases(self, router_id: str) -> AsyncIterator[BudgetChange]:
        """Billing's feed of budget changes (a long-lived stream, no deadline) until it breaks."""
        call = self._stub.WatchLeases(pb2.WatchLeasesRequest(router_id=router_id), metadata=outgoing_metadata())
        try:
            async for m in call:
                s = m.scope
                yield BudgetChange(m.revision, _SCOPE_KINDS.get(s.kind, ""), s.tenant_id, s.api_key_id, s.tag_key,
                                   s.tag_value, m.budget_id, m.ack_wanted, m.prices_changed)
        except grpc.aio.AioRpcError as exc:
            raise billing_error(exc) from None
        finally:
            call.cancel()

    async def ack_lease_change(self, router_id: str, revision: int, consumed: dict[str, int]) -> None:
        try:
            await self._stub.AckLeaseChange(
                pb2.AckLeaseChangeRequest(router_id=router_id, revision=revision,
                                          consumed=[pb2.LeaseConsumption(lease_id=lease_id, consumed=c)
                                                    for lease_id, c in consumed.items()]),
                metadata=outgoing_metadata(), timeout=self._timeout_s)
        except grpc.aio.AioRpcError as exc:
            raise billing_error(exc) from None

    async def settle(self, hold_id: str, usage: UsageRecord) -> Money:
        try:
            reply = await self._stub.Settle(pb2.SettleRequest(hold_id=hold_id, event=usage_to_proto(usage)),
                                            metadata=outgoing_metadata(), timeout=self._timeout_s)
        except grpc.aio.AioRpcError as exc:
            raise billing_error(exc) from None
        return Money(reply.cost.currency_code or "USD", reply.cost.micros)

    async def release(self, hold_id: str) -> None:
        try:
            await self._stub.Release(pb2.ReleaseRequest(hold_id=hold_id), metadata=outgoing_metadata(),
                                     timeout=self._timeout_s)
        except grpc.aio.AioRpcError as exc:
            raise billing_error(exc) from None

    async def record(self, usage: UsageRecord) -> Money:
        try:
            reply = await self._stub.RecordUsage(pb2.RecordUsageRequest(event=usage_to_proto(usage)),
                                                 metadata=outgoing_metadata(), timeout=self._timeout_s)
        except grpc.aio.AioRpcError as exc:
            raise billing_error(exc) from None
        return Money(reply.cost.currency_code or "USD", reply.cost.micros)

    async def check_budget(
        self, tenant_id: str, api_key_id: str, tags: dict[str, str], traffic_class: TrafficClass
    ) -> tuple[bool, AlertLevel]:
        try:
            reply = await self._stub.CheckBudget(
                pb2.CheckBudgetRequest(tenant_id=tenant_id, api_key_id=api_key_id, tags=tags,
                                       traffic_class=int(traffic_class)),  # type: ignore[arg-type]
                metadata=outgoing_metadata(), timeout=self._timeout_s,
            )
        except grpc.aio.AioRpcError as exc:
            raise billing_error(exc) from None
        return reply.allowed, AlertLevel(reply.level)

    async def list_prices(self) -> list[Price]:
        try:
            reply = await self._stub.ListPrices(pb2.ListPricesRequest(), metadata=outgoing_metadata(),
                                                timeout=self._timeout_s)
        except grpc.aio.AioRpcError as exc:
            raise billing_error(exc) from None
        return [price_from_proto(p) for p in reply.prices]

    async def close(self) -> None:
        await self._channel.close()
