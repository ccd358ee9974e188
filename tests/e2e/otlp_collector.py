"""A minimal OTLP/gRPC trace collector for end-to-end tests: every process of the mesh exports its
spans to it, and the test reads them back by trace id."""

from __future__ import annotations

import asyncio
from collections import defaultdict
from dataclasses import dataclass, field

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc


@dataclass(frozen=True)
class CollectedSpan:
    service: str
    name: str
    trace_id: str
    span_id: str
    parent_span_id: str
    kind: int


@dataclass
class Collector(trace_service_pb2_grpc.TraceServiceServicer):
    spans: list[CollectedSpan] = field(default_factory=list)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)

    async def Export(self, request: trace_service_pb2.ExportTraceServiceRequest,
                     context: grpc.aio.ServicerContext) -> trace_service_pb2.ExportTraceServiceResponse:
        for resource_spans in request.resource_spans:
            service = next((a.value.string_value for a in resource_spans.resource.attributes
                            if a.key == "service.name"), "")
            for scope in resource_spans.scope_spans:
                for span in scope.spans:
                    self.spans.append(CollectedSpan(service, span.name, span.trace_id.hex(), span.span_id.hex(),
                                                    span.parent_span_id.hex(), span.kind))
        self.arrived.set()
        return trace_service_pb2.ExportTraceServiceResponse()

    def services_in(self, trace_id: str) -> dict[str, list[str]]:
        found: dict[str, list[str]] = defaultdict(list)
        for span in self.spans:
            if span.trace_id == trace_id:
                found[span.service].append(span.name)
        return dict(found)

    async def wait_for(self, trace_id: str, services: set[str], timeout_s: float) -> dict[str, list[str]]:
        """Wait until spans of `trace_id` from every one of `services` arrived (or the timeout passes)."""
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout_s
        while not services <= set(self.services_in(trace_id)) and loop.time() < end:
            self.arrived.clear()
            try:
                await asyncio.wait_for(self.arrived.wait(), max(0.0, end - loop.time()))
            except TimeoutError:
                break
        return self.services_in(trace_id)


async def start_collector() -> tuple[grpc.aio.Server, Collector, int]:
    collector = Collector()
    server = grpc.aio.server()
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(collector, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, collector, port
