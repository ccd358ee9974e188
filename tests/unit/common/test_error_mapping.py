"""The error table: each domain error reaches the caller as its status, with rich details, and
anything unexpected becomes INTERNAL with a generic message (no internals leak)."""

from __future__ import annotations

from collections.abc import Sequence

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from autoglm.common.v1 import error_details_pb2 as autoglm_details
from services.common import errors
from services.common.error_mapping import INTERNAL_MESSAGE
from services.common.grpc_server import start_server

CASES: list[tuple[Exception, grpc.StatusCode]] = [
    (errors.InvalidInput("top_p must be in (0, 1], got 3", field="sampling.top_p"), grpc.StatusCode.INVALID_ARGUMENT),
    (errors.NotFound("no budget 'b1'"), grpc.StatusCode.NOT_FOUND),
    (errors.AlreadyExists("key exists"), grpc.StatusCode.ALREADY_EXISTS),
    (errors.FailedPrecondition("price already in force"), grpc.StatusCode.FAILED_PRECONDITION),
    (errors.Unauthenticated("missing bearer token"), grpc.StatusCode.UNAUTHENTICATED),
    (errors.PermissionDenied("model not allowed"), grpc.StatusCode.PERMISSION_DENIED),
    (errors.RateLimited("60 requests/min exceeded", retry_after_s=1.5), grpc.StatusCode.RESOURCE_EXHAUSTED),
    (errors.BudgetExceeded("monthly budget exhausted"), grpc.StatusCode.RESOURCE_EXHAUSTED),
    (errors.QueueFull("admission queue full"), grpc.StatusCode.RESOURCE_EXHAUSTED),
    (errors.NotReady("model loading"), grpc.StatusCode.UNAVAILABLE),
    (errors.NotImplementedYet("X is not implemented yet"), grpc.StatusCode.UNIMPLEMENTED),
    (KeyError("secret internal detail"), grpc.StatusCode.INTERNAL),
]


def _raising_handler(error: Exception) -> grpc.GenericRpcHandler:
    async def unary(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        raise error

    async def stream(request: bytes, context: grpc.aio.ServicerContext):  # type: ignore[no-untyped-def]
        yield b"first"
        raise error

    return grpc.method_handlers_generic_handler(
        "test.Raiser",
        {
            "Unary": grpc.unary_unary_rpc_method_handler(unary),
            "Stream": grpc.unary_stream_rpc_method_handler(stream),
        },
    )


@pytest.mark.parametrize(("error", "code"), CASES, ids=[type(e).__name__ for e, _ in CASES])
async def test_error_reaches_caller_as_its_status(serve, error: Exception, code: grpc.StatusCode) -> None:
    def register(server: grpc.aio.Server) -> Sequence[str]:
        server.add_generic_rpc_handlers((_raising_handler(error),))
        return []

    running = await serve(start_server("test", register))
    async with grpc.aio.insecure_channel(running.address) as chan:
        with pytest.raises(grpc.aio.AioRpcError) as unary_err:
            await chan.unary_unary("/test.Raiser/Unary")(b"", timeout=5)
        call = chan.unary_stream("/test.Raiser/Stream")(b"", timeout=5)
        assert await call.read() == b"first"
        with pytest.raises(grpc.aio.AioRpcError) as stream_err:
            await call.read()

    for err in (unary_err.value, stream_err.value):
        assert err.code() == code
        if isinstance(error, errors.DomainError):
            assert err.details() == error.message
            status = rpc_status.from_call(err)
            assert isinstance(status, status_pb2.Status)
            detail = autoglm_details.ErrorDetail()
            assert status.details[0].Unpack(detail)
            assert detail.reason == error.reason
        else:
            assert err.details() == INTERNAL_MESSAGE
            assert "secret" not in err.details()
    if isinstance(error, errors.RateLimited):
        retry = error_details_pb2.RetryInfo()
        assert rpc_status.from_call(unary_err.value).details[1].Unpack(retry)
        assert retry.retry_delay.ToMilliseconds() == 1500


async def test_malformed_request_bytes_get_invalid_argument_not_a_parser_trace(serve) -> None:
    from autoglm.router.v1 import router_service_pb2

    seen: list[object] = []

    async def complete(request: router_service_pb2.CompleteRequest, context: grpc.aio.ServicerContext) -> bytes:
        seen.append(request)
        return b""

    def register(server: grpc.aio.Server) -> Sequence[str]:
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("test.Parser", {
            "Complete": grpc.unary_unary_rpc_method_handler(
                complete, request_deserializer=router_service_pb2.CompleteRequest.FromString),
        }),))
        return []

    running = await serve(start_server("test", register))
    async with grpc.aio.insecure_channel(running.address) as chan:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await chan.unary_unary("/test.Parser/Complete")(b"\x0a\xff\xff\xff", timeout=5)
        assert await chan.unary_unary("/test.Parser/Complete")(
            router_service_pb2.CompleteRequest(prompt="hi").SerializeToString(), timeout=5) == b""
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "autoglm.router.v1.CompleteRequest" in err.value.details()
    assert "DecodeError" not in err.value.details()
    assert len(seen) == 1


@pytest.mark.parametrize("echo", ["x" * 100_000, "é" * 50_000])
async def test_a_message_echoing_a_huge_input_is_cut_and_the_status_survives(serve, echo: str) -> None:
    error = errors.NotFound(f"no job {echo!r} for this tenant", field="job_id")

    def register(server: grpc.aio.Server) -> Sequence[str]:
        server.add_generic_rpc_handlers((_raising_handler(error),))
        return []

    running = await serve(start_server("test", register))
    async with grpc.aio.insecure_channel(running.address) as chan:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await chan.unary_unary("/test.Raiser/Unary")(b"", timeout=5)
    # Not "Stream removed (received metadata size exceeds hard limit)": the domain status, cut short.
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    details = caught.value.details() or ""
    assert details.startswith("no job '") and details.endswith("…") and len(details.encode()) <= 1024
    assert rpc_status.from_call(caught.value).message == details


async def test_malformed_bytes_in_a_request_stream_get_invalid_argument_on_every_streaming_kind(serve) -> None:
    from autoglm.billing.v1 import billing_service_pb2

    seen: list[str] = []

    async def bidi(requests, context: grpc.aio.ServicerContext):  # type: ignore[no-untyped-def]
        async for request in requests:
            seen.append(request.event.event_id)
            yield b""

    async def client_stream(requests, context: grpc.aio.ServicerContext) -> bytes:  # type: ignore[no-untyped-def]
        async for request in requests:
            seen.append(request.event.event_id)
        return b""

    parse = billing_service_pb2.StreamUsageRequest.FromString

    def register(server: grpc.aio.Server) -> Sequence[str]:
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("test.Streams", {
            "Bidi": grpc.stream_stream_rpc_method_handler(bidi, request_deserializer=parse),
            "ClientStream": grpc.stream_unary_rpc_method_handler(client_stream, request_deserializer=parse),
        }),))
        return []

    good = billing_service_pb2.StreamUsageRequest(
        event=billing_service_pb2.UsageEvent(event_id="ok")).SerializeToString()
    running = await serve(start_server("test", register))
    async with grpc.aio.insecure_channel(running.address) as chan:
        with pytest.raises(grpc.aio.AioRpcError) as bidi_err:
            async for _ in chan.stream_stream("/test.Streams/Bidi")(iter([good, b"\xff\xff\xff"]), timeout=5):
                pass
        with pytest.raises(grpc.aio.AioRpcError) as client_err:
            await chan.stream_unary("/test.Streams/ClientStream")(iter([good, b"\x0a\xff\xff\xff"]), timeout=5)
    for err in (bidi_err, client_err):
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value
        assert "autoglm.billing.v1.StreamUsageRequest" in err.value.details()
        assert "DecodeError" not in err.value.details()
    assert seen == ["ok", "ok"]  # the messages before the garbage were served
