"""Small real upstream services for the sidecar tests: an InferenceService whose behaviour a test sets
(fail UNAVAILABLE on a share of calls, hang until cancelled, stream N messages, fail after the first
message) and that records what it received."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import grpc

from autoglm.billing.v1 import billing_service_pb2 as billing_pb
from autoglm.billing.v1 import billing_service_pb2_grpc as billing_grpc
from autoglm.inference.v1 import inference_service_pb2 as pb
from autoglm.inference.v1 import inference_service_pb2_grpc as pb_grpc
from services.common.grpc_server import RunningServer, start_server
from services.common.tracing import current_trace_id


@dataclass
class Behaviour:
    fail_ratio: float = 0.0
    hang: bool = False
    fail_after_first: bool = False
    messages: int = 3
    rng: random.Random = field(default_factory=lambda: random.Random(7))


@dataclass
class Record:
    calls: int = 0
    failures: int = 0
    cancelled: int = 0
    metadata: list[dict[str, str]] = field(default_factory=list)
    # Every x-forwarded-client-cert value each call carried (a repeated header would show twice).
    forwarded_certs: list[list[str]] = field(default_factory=list)
    trace_ids: list[str] = field(default_factory=list)
    hanging: asyncio.Event = field(default_factory=asyncio.Event)


class FakeInference(pb_grpc.InferenceServiceServicer):
    def __init__(self) -> None:
        self.behaviour = Behaviour()
        self.record = Record()

    async def _enter(self, context: grpc.aio.ServicerContext) -> None:
        self.record.calls += 1
        self.record.metadata.append({k: v for k, v in context.invocation_metadata() or () if isinstance(v, str)})
        self.record.forwarded_certs.append([str(v) for k, v in context.invocation_metadata() or ()
                                            if k == "x-forwarded-client-cert"])
        self.record.trace_ids.append(current_trace_id())
        if self.behaviour.hang:
            self.record.hanging.set()
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                self.record.cancelled += 1
                raise
        if self.behaviour.fail_ratio and self.behaviour.rng.random() < self.behaviour.fail_ratio:
            self.record.failures += 1
            await context.abort(grpc.StatusCode.UNAVAILABLE, "replica overloaded (test)")

    async def CountTokens(self, request: pb.CountTokensRequest, context: grpc.aio.ServicerContext
                          ) -> pb.CountTokensResponse:
        await self._enter(context)
        return pb.CountTokensResponse(token_count=len(request.prompt.split()), context_window=2048)

    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
                       ) -> AsyncIterator[pb.GenerateResponse]:
        await self._enter(context)
        for i in range(self.behaviour.messages):
            yield pb.GenerateResponse(delta=f"tok{i} ", token_ids=[i])
            if self.behaviour.fail_after_first:
                self.record.failures += 1
                await context.abort(grpc.StatusCode.UNAVAILABLE, "replica lost mid-stream (test)")


class FakeBilling(billing_grpc.BillingServiceServicer):
    async def StreamUsage(self, request_iterator: AsyncIterator[billing_pb.StreamUsageRequest],
                          context: grpc.aio.ServicerContext) -> AsyncIterator[billing_pb.StreamUsageResponse]:
        async for request in request_iterator:
            yield billing_pb.StreamUsageResponse(event_id=request.event.event_id)


async def start_fake_inference(fake: FakeInference) -> RunningServer:
    def register(server: grpc.aio.Server) -> list[str]:
        pb_grpc.add_InferenceServiceServicer_to_server(fake, server)
        return ["autoglm.inference.v1.InferenceService"]

    return await start_server("inference", register)


async def start_fake_billing(fake: FakeBilling) -> RunningServer:
    def register(server: grpc.aio.Server) -> list[str]:
        billing_grpc.add_BillingServiceServicer_to_server(fake, server)
        return ["autoglm.billing.v1.BillingService"]

    return await start_server("billing", register)
