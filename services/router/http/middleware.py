"""Request ids and trace context for every HTTP request (a plain ASGI middleware, so streams stay streams).

`traceparent` is continued when the caller sends one (else a trace starts here), `x-request-id` is kept
when sent (else made); both go back as response headers and into every log line and the request's
usage event, as on the gRPC side. An `http` log line records method, path, status and duration.
`BodyLimit` refuses bodies over the size limit (413) and `BodyTimeout` bodies that do not arrive in full
in time (408, the connection closed), so neither a huge nor a trickling client holds the router.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
import uuid

import structlog
from opentelemetry import propagate, trace
from opentelemetry.trace import SpanKind
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from services.common.tracing import REQUEST_ID_HEADER, _records_spans, _unrecorded_span, request_id_var
from services.router.http.errors import error_body

log = structlog.get_logger("router.http")
# A caller's x-request-id is kept when it is a plain token (it becomes the usage event id); else a new one.
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


class RequestIds:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self._tracer = trace.get_tracer("autoglm")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        sent_id = headers.get(REQUEST_ID_HEADER, "")
        request_id = sent_id if _REQUEST_ID.match(sent_id) else uuid.uuid4().hex
        parent = propagate.extract(headers)
        path = scope.get("path", "")
        if _records_spans():
            span = self._tracer.start_span(f"{scope['method']} {path}", context=parent, kind=SpanKind.SERVER,
                                           attributes={"http.request.method": scope["method"], "url.path": path})
        else:
            span = _unrecorded_span(parent)
        if not span.get_span_context().is_valid:  # no tracer provider installed: ids all the same
            span = _unrecorded_span(parent)
        context = span.get_span_context()
        trace_id = format(context.trace_id, "032x")
        traceparent = f"00-{trace_id}-{context.span_id:016x}-{int(context.trace_flags):02x}"
        status = 0

        async def send_with_ids(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", request_id.encode()),
                                      (b"traceparent", traceparent.encode())]
            await send(message)

        token = request_id_var.set(request_id)
        started = time.perf_counter()
        structlog.contextvars.bind_contextvars(trace_id=trace_id, request_id=request_id)
        try:
            with trace.use_span(span, end_on_exit=True):
                await self.app(scope, receive, send_with_ids)
        finally:
            log.info("http", method=scope["method"], path=path, status=status,
                     duration_ms=round((time.perf_counter() - started) * 1000, 3))
            structlog.contextvars.unbind_contextvars("trace_id", "request_id")
            request_id_var.reset(token)


class BodyLimit:
    """A body larger than `max_bytes` is refused with 413: at once when its length is declared, else as soon
    as that many bytes arrived (through the error handlers, so the answer is the same OpenAI body)."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            declared = dict(scope["headers"]).get(b"content-length", b"")
            if declared.isdigit() and int(declared) > self.max_bytes:
                body = json.dumps(error_body(f"the request body is larger than {self.max_bytes} bytes",
                                             "invalid_request_error", "request_too_large", None)).encode()
                await send({"type": "http.response.start", "status": 413,
                            "headers": [(b"content-type", b"application/json"),
                                        (b"content-length", str(len(body)).encode()), (b"connection", b"close")]})
                await send({"type": "http.response.body", "body": body})
                return
            received = 0

            async def counted() -> Message:
                nonlocal received
                message = await receive()
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise HTTPException(413, f"the request body is larger than {self.max_bytes} bytes")
                return message

            await self.app(scope, counted, send)
            return
        await self.app(scope, receive, send)


class BodyTimeout:
    """A request body that has not arrived in full `timeout_s` after the request began is answered 408
    (an OpenAI error body, `connection: close`), however slowly its bytes trickle in. Once the body is
    complete, waiting on the connection (for the client's disconnect) is not limited."""

    def __init__(self, app: ASGIApp, timeout_s: float) -> None:
        self.app = app
        self.timeout_s = timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout_s
        complete = False

        async def timed() -> Message:
            nonlocal complete
            if complete:
                return await receive()
            try:
                async with asyncio.timeout_at(deadline):
                    message = await receive()
            except TimeoutError:
                raise HTTPException(408, f"the request body did not arrive in full within {self.timeout_s:g} "
                                         "seconds; send the whole body at once", {"connection": "close"}) from None
            if message["type"] != "http.request" or not message.get("more_body", False):
                complete = True
            return message

        await self.app(scope, timed, send)
