"""What handlers depend on: the router's parts from app state, the caller's principal from the same
authenticator the gRPC side uses (hashed keys, constant-time compare), and the request context."""

from __future__ import annotations

from typing import Annotated, Protocol

from fastapi import Depends, Request

from services.common.tracing import current_request_id, current_span_id, current_trace_id
from services.router.auth.authenticator import Authenticator
from services.router.convert import parse_tags
from services.router.gateway import Gateway
from services.router.input_limits import InputLimits
from services.router.registry import ModelEntry
from services.router.types import Principal, RequestContext


class Backend(Protocol):
    """The parts of the router the HTTP API uses (RouterApp has them)."""

    gateway: Gateway
    authenticator: Authenticator
    input_limits: InputLimits

    def healthy_replicas(self, model: ModelEntry) -> dict[str, int]: ...

    def store_available(self) -> bool: ...


def backend(request: Request) -> Backend:
    return request.app.state.backend  # type: ignore[no-any-return]


async def principal(request: Request) -> Principal:
    """The caller, from `authorization: Bearer <API key or JWT>` (401 `invalid_api_key` otherwise). A
    coroutine, so FastAPI runs it on the event loop (a plain function would cost a worker-thread hop per
    request); a key memory lacks is looked up in the store on a worker thread."""
    return await backend(request).authenticator.aauthenticate(request.headers.get("authorization", ""))


Caller = Annotated[Principal, Depends(principal)]


def header_tags(request: Request) -> dict[str, str]:
    return parse_tags(request.headers.get("x-autoglm-tags", ""))


def request_contexts(principal: Principal, tags: dict[str, str], n: int) -> list[RequestContext]:
    """One context per generation: the request id (from `x-request-id`, else new) for the first, the same id
    with `.1`, `.2`, … for the others, so each of the n usage events has an id of its own."""
    request_id, trace_id, span_id = current_request_id(), current_trace_id(), current_span_id()
    return [RequestContext(request_id if i == 0 else f"{request_id}.{i}", trace_id, principal, dict(tags),
                           span_id=span_id)
            for i in range(n)]
