"""The gRPC column of the one error table (`error_table.py`), and the handler wrapper that applies it.

| domain error        | status              | notes                                         |
|---------------------|---------------------|-----------------------------------------------|
| InvalidInput        | INVALID_ARGUMENT    | + google.rpc.BadRequest when a field is named |
| NotFound            | NOT_FOUND           |                                               |
| AlreadyExists       | ALREADY_EXISTS      |                                               |
| FailedPrecondition  | FAILED_PRECONDITION |                                               |
| Unauthenticated     | UNAUTHENTICATED     |                                               |
| PermissionDenied    | PERMISSION_DENIED   |                                               |
| RateLimited         | RESOURCE_EXHAUSTED  | + google.rpc.RetryInfo with the delay         |
| BudgetExceeded      | RESOURCE_EXHAUSTED  | reason BUDGET_EXCEEDED: never retried         |
| QueueFull           | RESOURCE_EXHAUSTED  | + RetryInfo when a delay is known             |
| Unavailable/NotReady| UNAVAILABLE         | safe to retry                                 |
| DeadlineExceeded    | DEADLINE_EXCEEDED   |                                               |
| Cancelled           | CANCELLED           |                                               |
| NotImplementedYet   | UNIMPLEMENTED       |                                               |
| Internal            | INTERNAL            | a fault inside the mesh; generic message      |
| anything else       | INTERNAL            | generic message; the exception is logged      |

Every error status carries an `autoglm.common.v1.ErrorDetail` (reason, field, metadata) in
`grpc-status-details-bin`, readable with grpcio-status or any language's rich-status helpers.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import structlog
from google.protobuf import any_pb2, duration_pb2
from google.protobuf.message import DecodeError
from google.rpc import error_details_pb2, status_pb2

from autoglm.common.v1 import error_details_pb2 as autoglm_error_details_pb2
from services.common import errors
from services.common.error_table import ERROR_TABLE

log = structlog.get_logger(__name__)

# The gRPC column of the one error table (services/common/error_table.py, which also holds the HTTP one).
STATUS_TABLE: dict[type[errors.DomainError], grpc.StatusCode] = {
    klass: grpc.StatusCode[row.grpc] for klass, row in ERROR_TABLE.items()
}

INTERNAL_MESSAGE = "internal error; the server logged the details under this call's trace id"
# Longest message (UTF-8 bytes) a caller is sent. It travels in the trailers three times (grpc-message,
# the Status in grpc-status-details-bin, its BadRequest), and gRPC drops a call whose trailers pass
# 16 KiB ("Stream removed", RESOURCE_EXHAUSTED): a message echoing a huge input is cut, not the status.
MAX_MESSAGE_BYTES = 1024


def caller_message(message: str) -> str:
    """`message`, cut to MAX_MESSAGE_BYTES (on a character boundary, marked with "…")."""
    encoded = message.encode("utf-8", "replace")
    if len(encoded) <= MAX_MESSAGE_BYTES:
        return message
    return encoded[:MAX_MESSAGE_BYTES - 3].decode("utf-8", "ignore") + "…"


def status_code_for(error: errors.DomainError) -> grpc.StatusCode:
    """The status for a domain error: the most specific entry of STATUS_TABLE along its MRO."""
    for klass in type(error).__mro__:
        if klass in STATUS_TABLE:
            return STATUS_TABLE[klass]  # type: ignore[index]
    return grpc.StatusCode.INTERNAL


def rich_status(code: grpc.StatusCode, error: errors.DomainError) -> status_pb2.Status:
    """google.rpc.Status with ErrorDetail, plus RetryInfo / BadRequest where they apply."""
    details: list[any_pb2.Any] = []
    detail = any_pb2.Any()
    detail.Pack(
        autoglm_error_details_pb2.ErrorDetail(reason=error.reason, field=error.field, metadata=error.metadata)
    )
    details.append(detail)
    retry_after = getattr(error, "retry_after_s", 0.0)
    if retry_after and retry_after > 0:
        delay = duration_pb2.Duration()
        delay.FromMilliseconds(max(1, int(retry_after * 1000)))
        retry = any_pb2.Any()
        retry.Pack(error_details_pb2.RetryInfo(retry_delay=delay))
        details.append(retry)
    if error.field and isinstance(error, errors.InvalidInput):
        bad = any_pb2.Any()
        bad.Pack(
            error_details_pb2.BadRequest(
                field_violations=[error_details_pb2.BadRequest.FieldViolation(
                    field=error.field, description=caller_message(error.message))]
            )
        )
        details.append(bad)
    return status_pb2.Status(code=code.value[0], message=caller_message(error.message), details=details)


async def abort_with(context: grpc.aio.ServicerContext, error: BaseException) -> None:
    """Abort the call with the status the table gives `error` (INTERNAL for anything unexpected)."""
    if isinstance(error, errors.DomainError):
        code = status_code_for(error)
        status = rich_status(code, error)
        trailing = (("grpc-status-details-bin", status.SerializeToString()),)
        await context.abort(code, status.message, trailing_metadata=trailing)
    log.error("unhandled_error", exc_info=error)
    await context.abort(grpc.StatusCode.INTERNAL, INTERNAL_MESSAGE)


def _is_abort(error: BaseException) -> bool:
    # context.abort() raises an exception grpc uses internally; it must pass through untouched.
    return isinstance(error, asyncio.CancelledError) or type(error).__name__ == "AbortError"


class Undecodable:
    """Stands in for a request message whose bytes did not parse; the behaviour wrapper answers
    INVALID_ARGUMENT instead of letting grpc answer UNKNOWN with the parser's exception text."""

    def __init__(self, type_name: str) -> None:
        self.type_name = type_name

    def error(self) -> errors.InvalidInput:
        return errors.InvalidInput(f"the request is not a valid {self.type_name} message (malformed protobuf bytes)",
                                   reason="MALFORMED_REQUEST")


def safe_deserializer(deserialize: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserialize is None:
        return None
    owner = getattr(deserialize, "__self__", None)
    type_name = getattr(getattr(owner, "DESCRIPTOR", None), "full_name", "request")

    def parse(data: bytes) -> Any:
        try:
            return deserialize(data)
        except DecodeError:
            return Undecodable(type_name)

    return parse


async def _checked_iterator(iterator: AsyncIterator[Any]) -> AsyncIterator[Any]:
    async for message in iterator:
        if isinstance(message, Undecodable):
            raise message.error()
        yield message


def _checked(request_or_iterator: Any) -> Any:
    if isinstance(request_or_iterator, Undecodable):
        raise request_or_iterator.error()
    if hasattr(request_or_iterator, "__aiter__"):
        return _checked_iterator(request_or_iterator)
    return request_or_iterator


def _wrap_unary(behavior: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    async def wrapper(request_or_iterator: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await behavior(_checked(request_or_iterator), context)
        except BaseException as error:
            if _is_abort(error):
                raise
            await abort_with(context, error)

    return wrapper


def _wrap_stream(behavior: Callable[..., AsyncIterator[Any]]) -> Callable[..., AsyncIterator[Any]]:
    async def wrapper(request_or_iterator: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        try:
            async for item in behavior(_checked(request_or_iterator), context):
                yield item
        except BaseException as error:
            if _is_abort(error) or isinstance(error, GeneratorExit):
                raise
            await abort_with(context, error)

    return wrapper


def wrap_handler(handler: grpc.RpcMethodHandler, wrap_unary: Callable[..., Any], wrap_stream: Callable[..., Any],
                 safe_requests: bool = False) -> grpc.RpcMethodHandler:
    """Return `handler` with its behaviour wrapped, keeping its call type and (de)serializers (with
    `safe_requests`, a request that does not parse reaches the wrappers as `Undecodable`).

    Streaming behaviours written as coroutines that call `context.write()` (the health service's
    Watch, for one) are wrapped with `wrap_unary`, async generators with `wrap_stream`.
    """

    def stream(behavior: Callable[..., Any]) -> Callable[..., Any]:
        return wrap_stream(behavior) if inspect.isasyncgenfunction(behavior) else wrap_unary(behavior)

    deserializer = safe_deserializer(handler.request_deserializer) if safe_requests else handler.request_deserializer

    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(
            wrap_unary(handler.unary_unary), deserializer, handler.response_serializer
        )
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(
            wrap_unary(handler.stream_unary), deserializer, handler.response_serializer
        )
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(
            stream(handler.unary_stream), deserializer, handler.response_serializer
        )
    return grpc.stream_stream_rpc_method_handler(
        stream(handler.stream_stream), deserializer, handler.response_serializer
    )


class ErrorMapping:
    """Innermost handler wrapper: maps domain errors raised by servicers to statuses (see the table above)."""

    @staticmethod
    def wrap(method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        """`handler` of `method` answering domain errors and unparsable requests with their statuses."""
        if method.startswith("/grpc."):
            return wrap_handler(handler, _wrap_unary, _wrap_stream)
        return wrap_handler(handler, _wrap_unary, _wrap_stream, safe_requests=True)
