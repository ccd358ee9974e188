"""gRPC adapter for billing's ReportEngineUsage (through the replica's sidecar's outbound listener)."""

from __future__ import annotations

from collections.abc import Sequence

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from autoglm.billing.v1 import billing_service_pb2 as pb2
from autoglm.billing.v1 import billing_service_pb2_grpc as pb2_grpc
from services.common.generation import TrafficClass
from services.common.peer_errors import billing_error
from services.common.tracing import outgoing_metadata
from services.inference.engine.types import FinishedSequence

# The engine's priorities → the mesh's traffic classes (autoglm.common.v1.TrafficClass).
_CLASSES = {TrafficClass.CORE: 1, TrafficClass.INTERACTIVE: 2, TrafficClass.BATCH: 3}
RECONNECT_OPTIONS = (("grpc.initial_reconnect_backoff_ms", 200), ("grpc.max_reconnect_backoff_ms", 2000),
                     ("grpc.min_reconnect_backoff_ms", 200))


def _ts(us: int) -> Timestamp:
    return Timestamp(seconds=us // 1_000_000, nanos=(us % 1_000_000) * 1000)


def record_to_proto(finished: FinishedSequence) -> pb2.EngineUsageRecord:
    request, who = finished.request, finished.request.attribution
    return pb2.EngineUsageRecord(
        request_id=request.request_id, replica_id=finished.replica_id, tenant_id=request.tenant_id,
        api_key_id=who.api_key_id, model=who.model, model_version=who.model_version, tags=dict(who.tags),
        prompt_tokens=finished.prompt_tokens, completion_tokens=finished.completion_tokens,
        status=int(finished.status),  # type: ignore[arg-type]
        traffic_class=_CLASSES[request.traffic_class],  # type: ignore[arg-type]
        start_time=_ts(finished.start_us), end_time=_ts(finished.end_us), router_id=who.router_id,
        trace_id=who.trace_id)


class GrpcEngineUsage:
    def __init__(self, target: str, timeout_s: float = 5.0) -> None:
        self._channel = grpc.aio.insecure_channel(target, options=RECONNECT_OPTIONS)
        self._stub = pb2_grpc.BillingServiceStub(self._channel)
        self._timeout_s = timeout_s

    async def report(self, records: Sequence[FinishedSequence]) -> list[tuple[int, str]]:
        request = pb2.ReportEngineUsageRequest(records=[record_to_proto(r) for r in records])
        try:
            reply = await self._stub.ReportEngineUsage(request, metadata=outgoing_metadata(), timeout=self._timeout_s)
        except grpc.aio.AioRpcError as exc:
            raise billing_error(exc) from None
        return [(r.index, f"{r.error_code}: {r.error_message}") for r in reply.rejections]

    async def close(self) -> None:
        await self._channel.close()
