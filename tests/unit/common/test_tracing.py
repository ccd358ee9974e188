"""The server-side tracing wrapper: the caller's trace id (or a new one) reaches the handler's logs and the
next hop, whether or not anything collects spans."""

from __future__ import annotations

from typing import Any

import grpc
import pytest
import structlog
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider

from services.common import tracing

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_SPAN = "00f067aa0ba902b7"


class Context:
    """The two things the wrapper reads from a grpc.aio servicer context."""

    def __init__(self, metadata: tuple[tuple[str, str], ...]) -> None:
        self._metadata = metadata

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._metadata

    def code(self) -> grpc.StatusCode | None:
        return None


async def call_through_wrapper(metadata: tuple[tuple[str, str], ...]) -> dict[str, Any]:
    seen: dict[str, Any] = {}

    async def handler(request: bytes, context: Any) -> bytes:
        seen["trace_id"] = tracing.current_trace_id()
        seen["request_id"] = tracing.current_request_id()
        seen["outgoing"] = dict(tracing.outgoing_metadata())
        seen["log_context"] = structlog.contextvars.get_contextvars()
        return b"ok"

    wrapped = tracing.Tracing("test").wrap("/test.v1.Test/Call", grpc.unary_unary_rpc_method_handler(handler))
    assert await wrapped.unary_unary(b"", Context(metadata)) == b"ok"
    seen["after"] = structlog.contextvars.get_contextvars()
    return seen


@pytest.fixture(params=[True, False], ids=["spans-collected", "no-span-collector"])
def collecting(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> bool:
    if not isinstance(trace.get_tracer_provider(), TracerProvider):
        trace.set_tracer_provider(TracerProvider())  # what every service process installs at start
    monkeypatch.setattr(tracing, "_records_spans", lambda: request.param)
    return bool(request.param)


async def test_the_callers_trace_id_reaches_logs_and_the_next_hop(collecting: bool) -> None:
    seen = await call_through_wrapper((("traceparent", f"00-{TRACE_ID}-{PARENT_SPAN}-01"),
                                       ("x-request-id", "req-7")))
    assert seen["trace_id"] == TRACE_ID
    assert seen["log_context"]["trace_id"] == TRACE_ID and seen["log_context"]["request_id"] == "req-7"
    version, trace_id, span_id, flags = seen["outgoing"]["traceparent"].split("-")
    assert (version, trace_id, flags) == ("00", TRACE_ID, "01")
    assert span_id != PARENT_SPAN and int(span_id, 16) != 0  # this hop is a span of its own
    assert seen["outgoing"]["x-request-id"] == "req-7"
    assert "trace_id" not in seen["after"]  # nothing of the call stays bound after it


async def test_a_call_without_trace_context_starts_a_sampled_trace(collecting: bool) -> None:
    first = await call_through_wrapper(())
    second = await call_through_wrapper(())
    assert len(first["trace_id"]) == 32 and int(first["trace_id"], 16) != 0
    assert first["trace_id"] != second["trace_id"]
    assert first["outgoing"]["traceparent"].split("-")[1] == first["trace_id"]
    assert int(first["outgoing"]["traceparent"].split("-")[3], 16) & 1  # sampled
    assert len(first["request_id"]) == 32


async def test_an_unsampled_caller_stays_unsampled_downstream(collecting: bool) -> None:
    seen = await call_through_wrapper((("traceparent", f"00-{TRACE_ID}-{PARENT_SPAN}-00"),))
    assert seen["outgoing"]["traceparent"].startswith(f"00-{TRACE_ID}-")
    assert not int(seen["outgoing"]["traceparent"].split("-")[3], 16) & 1
