"""Prometheus metrics shared by every service: per-RPC counters and latency histograms, and the
HTTP endpoint that exposes them (loopback, `--metrics-port`). Areas add their own metrics
(tokens/s, queue depth, spend, breaker state) to the same default registry."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from prometheus_client import Counter, Histogram, start_http_server

from services.common.error_mapping import wrap_handler

RPC_STARTED = Counter("autoglm_rpc_started_total", "RPCs started", ["service", "method"])
RPC_HANDLED = Counter("autoglm_rpc_handled_total", "RPCs finished, by status code", ["service", "method", "code"])
RPC_LATENCY = Histogram(
    "autoglm_rpc_duration_seconds", "RPC duration until the last message", ["service", "method"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
)
STREAM_MESSAGES = Counter("autoglm_rpc_stream_messages_sent_total", "Messages sent on server streams",
                          ["service", "method"])


def start_metrics_endpoint(port: int, host: str = "127.0.0.1") -> int:
    """Serve /metrics on host:port (port 0 picks a free one). Returns the bound port."""
    server, _thread = start_http_server(port, addr=host)
    return int(server.server_port)


def _code_of(context: grpc.aio.ServicerContext, error: BaseException | None) -> str:
    code = context.code() if hasattr(context, "code") else None
    if isinstance(code, grpc.StatusCode):
        return code.name
    if error is not None:
        return "CANCELLED" if type(error).__name__ == "CancelledError" else "UNKNOWN"
    return "OK"


class RpcMetrics:
    """Handler wrapper: per-RPC counters and latency."""

    def __init__(self, service: str) -> None:
        self._service = service

    def wrap(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        """`handler` of `method` counted and timed on every call."""
        if method.startswith(("/grpc.health.", "/grpc.reflection.")):
            return handler
        labels = (self._service, method)
        started, handled, latency, sent = (
            RPC_STARTED.labels(*labels), RPC_HANDLED, RPC_LATENCY.labels(*labels), STREAM_MESSAGES.labels(*labels)
        )

        def wrap_unary(behavior: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
            async def wrapper(request: Any, context: grpc.aio.ServicerContext) -> Any:
                started.inc()
                begin, error = time.perf_counter(), None
                try:
                    return await behavior(request, context)
                except BaseException as exc:
                    error = exc
                    raise
                finally:
                    latency.observe(time.perf_counter() - begin)
                    handled.labels(*labels, _code_of(context, error)).inc()

            return wrapper

        def wrap_stream(behavior: Callable[..., AsyncIterator[Any]]) -> Callable[..., AsyncIterator[Any]]:
            async def wrapper(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                started.inc()
                begin, error = time.perf_counter(), None
                try:
                    async for item in behavior(request, context):
                        sent.inc()
                        yield item
                except BaseException as exc:
                    error = exc
                    raise
                finally:
                    latency.observe(time.perf_counter() - begin)
                    handled.labels(*labels, _code_of(context, error)).inc()

            return wrapper

        return wrap_handler(handler, wrap_unary, wrap_stream)
