"""One HTTP request is one server span in the caller's trace backend: the router's own (kept in step with
the gRPC side's, trace id and x-request-id alike), not a second tree of FastAPI's built-in telemetry spans
(request, dependencies, endpoint, serialization) for every call."""

from __future__ import annotations

import httpx
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from services.router.http.app import build_app
from tests.unit.router.http.fakes import KEY, FakeBackend, FakeGateway


async def test_a_chat_completion_exports_exactly_one_span_the_router_s_server_span() -> None:
    exporter = InMemorySpanExporter()
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        trace.set_tracer_provider(TracerProvider())
        provider = trace.get_tracer_provider()
    assert isinstance(provider, TracerProvider)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    app = build_app(FakeBackend(FakeGateway()))  # type: ignore[arg-type]
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://router") as http:
        answer = await http.post("/v1/chat/completions", headers={"authorization": f"Bearer {KEY}"},
                                 json={"model": "tiny", "messages": [{"role": "user", "content": "hi"}]})
    assert answer.status_code == 200
    spans = [s for s in exporter.get_finished_spans()
             if s.context.trace_id == int(answer.headers["traceparent"].split("-")[1], 16)]
    assert [(s.name, s.kind) for s in spans] == [("POST /v1/chat/completions", SpanKind.SERVER)]
