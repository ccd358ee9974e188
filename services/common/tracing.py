"""OpenTelemetry set-up and W3C trace-context handling for servers and clients.

Servers: `Tracing` wraps every handler: it extracts `traceparent`/`tracestate` from the incoming
metadata (or starts a new trace), opens one server span per call (only its ids when no processor
collects spans), and binds trace_id / request_id into the structlog context. Clients:
`outgoing_metadata()` returns the metadata that carries the current trace and request id to the
next hop.
"""

from __future__ import annotations

import asyncio
import contextvars
import os
import random
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import grpc
import structlog
from opentelemetry import propagate, trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor, SpanExporter
from opentelemetry.trace import NonRecordingSpan, SpanContext, SpanKind, Status, StatusCode, TraceFlags

from services.common.error_mapping import wrap_handler

REQUEST_ID_HEADER = "x-request-id"
_log = structlog.get_logger("autoglm.rpc")
request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="")


def configure_tracing(
    service: str, otlp_endpoint: str = "", exporter: SpanExporter | None = None
) -> TracerProvider:
    """Install a TracerProvider for this process. `exporter` (e.g. an in-memory one in tests) wins over OTLP;
    with no endpoint given, the standard OTEL_EXPORTER_OTLP_ENDPOINT variable is honoured."""
    otlp_endpoint = otlp_endpoint or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT", "")
    provider = TracerProvider(resource=Resource.create({"service.name": service}))
    if exporter is not None:
        provider.add_span_processor(SimpleSpanProcessor(exporter))
    elif otlp_endpoint:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=otlp_endpoint, insecure=True)))
    trace.set_tracer_provider(provider)
    return provider


def current_trace_id() -> str:
    ctx = trace.get_current_span().get_span_context()
    return format(ctx.trace_id, "032x") if ctx.is_valid else ""


def current_span_id() -> str:
    ctx = trace.get_current_span().get_span_context()
    return format(ctx.span_id, "016x") if ctx.is_valid else ""


def current_request_id() -> str:
    return request_id_var.get()


def outgoing_metadata(extra: Sequence[tuple[str, str]] = ()) -> list[tuple[str, str]]:
    """Metadata for a call to the next hop: traceparent/tracestate of the current span and x-request-id."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    metadata = list(carrier.items())
    request_id = request_id_var.get()
    if request_id:
        metadata.append((REQUEST_ID_HEADER, request_id))
    metadata.extend(extra)
    return metadata


def _records_spans() -> bool:
    """Whether the installed TracerProvider hands spans to anyone (an exporter or another processor)."""
    processor = getattr(trace.get_tracer_provider(), "_active_span_processor", None)
    processors = getattr(processor, "_span_processors", None)
    return processors is None or bool(processors)


def _unrecorded_span(parent: Any) -> trace.Span:
    """The server span when nobody collects spans: only its ids, so the trace id still reaches the logs,
    the next hop and billing, without the SDK building a span that nothing exports (about a tenth of a
    millisecond per call on the router's path)."""
    outer = trace.get_current_span(parent).get_span_context()
    if outer.is_valid:
        trace_id, flags = outer.trace_id, outer.trace_flags
    else:
        trace_id, flags = random.getrandbits(128) or 1, TraceFlags(TraceFlags.SAMPLED)
    return NonRecordingSpan(SpanContext(trace_id, random.getrandbits(64) or 1, is_remote=False, trace_flags=flags))


def record_child_spans(name: str, children: Sequence[tuple[str, str, dict[str, Any]]], start_ns: int) -> None:
    """One span `name` per (trace id, parent span id, attributes), each a child of that remote span, from
    `start_ns` to now: how a process that handles a batch (billing's usage stream) puts each item's work
    in the trace of the request it came from. Nothing when nobody collects spans."""
    if not children or not _records_spans():
        return
    tracer = trace.get_tracer("autoglm")
    flags = TraceFlags(TraceFlags.SAMPLED)
    for trace_hex, span_hex, attributes in children:
        parent = SpanContext(int(trace_hex, 16), int(span_hex, 16), is_remote=True, trace_flags=flags)
        tracer.start_span(name, context=trace.set_span_in_context(NonRecordingSpan(parent)),
                          kind=SpanKind.CONSUMER, attributes=attributes, start_time=start_ns).end()


def _metadata_dict(context: grpc.aio.ServicerContext) -> dict[str, str]:
    return {k: v for k, v in (context.invocation_metadata() or ()) if isinstance(v, str)}


def _defer(callback: Callable[[], None]) -> None:
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        callback()
        return
    loop.call_soon(callback, context=contextvars.copy_context())


class Tracing:
    """Outermost handler wrapper: one span per call, trace and request ids bound for logging."""

    def __init__(self, service: str) -> None:
        self._service = service

    def wrap(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        """`handler` of `method` with a span, bound ids and the `rpc` log line around every call."""
        if method.startswith(("/grpc.health.", "/grpc.reflection.")):
            return handler
        tracer = trace.get_tracer("autoglm")

        def enter(context: grpc.aio.ServicerContext) -> tuple[Any, list[contextvars.Token[Any]]]:
            md = _metadata_dict(context)
            parent = propagate.extract(md)
            if _records_spans():
                span = tracer.start_span(method.lstrip("/"), context=parent, kind=SpanKind.SERVER,
                                         attributes={"rpc.system": "grpc", "rpc.method": method})
            else:
                span = _unrecorded_span(parent)
            request_id = md.get(REQUEST_ID_HEADER) or uuid.uuid4().hex
            tokens = [request_id_var.set(request_id)]
            ctx_token = trace.use_span(span, end_on_exit=False)
            ctx_token.__enter__()
            structlog.contextvars.bind_contextvars(
                trace_id=format(span.get_span_context().trace_id, "032x"), request_id=request_id, rpc=method
            )
            return (span, ctx_token, time.perf_counter()), tokens

        def leave(state: tuple[Any, Any, float], tokens: list[contextvars.Token[Any]], context: grpc.aio.ServicerContext,
                  error: BaseException | None) -> None:
            span, ctx_token, started = state
            duration_ms = round((time.perf_counter() - started) * 1000, 3)
            code = context.code() if hasattr(context, "code") else None
            status = code.name if isinstance(code, grpc.StatusCode) else (
                "CANCELLED" if type(error).__name__ == "CancelledError" else ("UNKNOWN" if error else "OK"))
            failed = error is not None or (code not in (None, grpc.StatusCode.OK))

            def record() -> None:
                _log.info("rpc", status=status, duration_ms=duration_ms)
                if failed:
                    span.set_status(Status(StatusCode.ERROR, str(code or type(error).__name__)))
                if code is not None:
                    span.set_attribute("rpc.grpc.status_code",
                                       code.value[0] if isinstance(code, grpc.StatusCode) else code)
                span.end()

            # The log line and the span's end run just after the answer has been handed to grpc (in a copy
            # of this context, so the line still carries the trace and request ids).
            _defer(record)
            ctx_token.__exit__(None, None, None)
            for token in tokens:
                request_id_var.reset(token)
            structlog.contextvars.unbind_contextvars("trace_id", "request_id", "rpc")

        def wrap_unary(behavior: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
            async def wrapper(request: Any, context: grpc.aio.ServicerContext) -> Any:
                state, tokens = enter(context)
                error: BaseException | None = None
                try:
                    return await behavior(request, context)
                except BaseException as exc:
                    error = exc
                    raise
                finally:
                    leave(state, tokens, context, error)

            return wrapper

        def wrap_stream(behavior: Callable[..., AsyncIterator[Any]]) -> Callable[..., AsyncIterator[Any]]:
            async def wrapper(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                state, tokens = enter(context)
                error: BaseException | None = None
                try:
                    async for item in behavior(request, context):
                        yield item
                except BaseException as exc:
                    error = exc
                    raise
                finally:
                    leave(state, tokens, context, error)

            return wrapper

        return wrap_handler(handler, wrap_unary, wrap_stream)
