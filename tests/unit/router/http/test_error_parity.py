"""Both transports answer every row of the one error table: the same domain error raised by the gateway
is the row's gRPC status on RouterService and the row's HTTP status, OpenAI type/code and headers on the
OpenAI-compatible API (non-streamed, and streamed before the first byte)."""

from __future__ import annotations

from collections.abc import Sequence
from types import SimpleNamespace

import grpc
import httpx
import pytest

from autoglm.router.v1 import router_service_pb2 as pb2
from autoglm.router.v1 import router_service_pb2_grpc as pb2_grpc
from services.common import errors
from services.common.error_table import ERROR_TABLE, INTERNAL_ROW, ErrorRow
from services.common.grpc_server import start_server
from services.router.http.app import build_app
from services.router.input_limits import InputLimits
from services.router.servicer import RouterServicer
from tests.unit.router.http.fakes import KEY, FakeAuthenticator, FakeBackend, FakeGateway, check_fake_matches_gateway

# One error per row of the table (a new row needs a case here: see the coverage test below).
CASES: dict[type[BaseException], BaseException] = {
    errors.InvalidInput: errors.InvalidInput("top_p must be in (0, 1]"),
    errors.NotFound: errors.NotFound("no such job"),
    errors.AlreadyExists: errors.AlreadyExists("exists"),
    errors.FailedPrecondition: errors.FailedPrecondition("not now"),
    errors.Unauthenticated: errors.Unauthenticated("API key agk_x… was revoked"),
    errors.PermissionDenied: errors.PermissionDenied("this API key may not call model 'big'"),
    errors.QuotaExceeded: errors.QuotaExceeded("quota used up", retry_after_s=3),
    errors.RateLimited: errors.RateLimited("60 requests/min exceeded", retry_after_s=1.5),
    errors.BudgetExceeded: errors.BudgetExceeded("monthly budget exhausted"),
    errors.QueueFull: errors.QueueFull("every replica is full"),
    errors.Unavailable: errors.Unavailable("billing is unavailable"),
    errors.DeadlineExceeded: errors.DeadlineExceeded("deadline passed"),
    errors.Cancelled: errors.Cancelled("cancelled"),
    errors.NotImplementedYet: errors.NotImplementedYet("not yet"),
    errors.Internal: errors.Internal("an inference replica failed this request"),
    KeyError: KeyError("/internal/secret"),
}
ROWS: list[tuple[BaseException, ErrorRow]] = [
    (CASES[klass], ERROR_TABLE.get(klass, INTERNAL_ROW)) for klass in CASES  # type: ignore[call-overload]
]
CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}


def test_every_row_of_the_table_has_a_case() -> None:
    assert set(ERROR_TABLE) <= set(CASES)
    check_fake_matches_gateway()


@pytest.fixture
async def grpc_stub(serve):  # type: ignore[no-untyped-def]
    gateway = FakeGateway()

    def register(server: grpc.aio.Server) -> Sequence[str]:
        parts = SimpleNamespace(gateway=gateway, authenticator=FakeAuthenticator(), input_limits=InputLimits())
        pb2_grpc.add_RouterServiceServicer_to_server(RouterServicer(parts), server)  # type: ignore[arg-type]
        return []

    running = await serve(start_server("router", register))
    async with grpc.aio.insecure_channel(running.address) as channel:
        yield gateway, pb2_grpc.RouterServiceStub(channel)


@pytest.mark.parametrize(("error", "row"), ROWS, ids=[type(e).__name__ for e, _ in ROWS])
async def test_both_transports_answer_the_row(grpc_stub, error: BaseException, row: ErrorRow) -> None:  # type: ignore[no-untyped-def]
    gateway, stub = grpc_stub
    gateway.error = error
    metadata = (("authorization", f"Bearer {KEY}"),)
    with pytest.raises(grpc.aio.AioRpcError) as unary:
        await stub.Complete(pb2.CompleteRequest(model="tiny", prompt="hi"), metadata=metadata, timeout=10)
    with pytest.raises(grpc.aio.AioRpcError) as streamed:
        async for _ in stub.Generate(pb2.GenerateRequest(model="tiny", prompt="hi"), metadata=metadata, timeout=10):
            pass
    assert unary.value.code() == streamed.value.code() == grpc.StatusCode[row.grpc]

    app = build_app(FakeBackend(gateway))  # type: ignore[arg-type]
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app, raise_app_exceptions=False),
                                 base_url="http://router") as client:
        for body in (CHAT, {**CHAT, "stream": True}):
            answer = await client.post("/v1/chat/completions", json=body, headers={"authorization": f"Bearer {KEY}"})
            assert answer.status_code == row.http
            assert answer.headers["content-type"] == "application/json"
            detail = answer.json()["error"]
            assert (detail["type"], detail["code"]) == (row.type, row.code)
            if isinstance(error, errors.DomainError):
                assert detail["message"] == error.message == unary.value.details()
            else:
                assert "secret" not in answer.text and "Traceback" not in answer.text


async def test_retry_headers_follow_the_table() -> None:
    expected = {
        errors.RateLimited: {"retry-after": "2", "retry-after-ms": "1500"},
        errors.BudgetExceeded: {"x-should-retry": "false"},
        errors.Unavailable: {"retry-after": "1", "retry-after-ms": "1000"},
        errors.QueueFull: {"retry-after": "1", "retry-after-ms": "1000"},
    }
    for klass, headers in expected.items():
        app = build_app(FakeBackend(FakeGateway(error=CASES[klass])))  # type: ignore[arg-type]
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://router") as client:
            answer = await client.post("/v1/chat/completions", json=CHAT, headers={"authorization": f"Bearer {KEY}"})
        assert {k: answer.headers.get(k) for k in headers} == headers, klass.__name__
        if klass is not errors.BudgetExceeded:
            assert "x-should-retry" not in answer.headers


async def test_field_names_become_openai_params() -> None:
    cases = [(errors.NotFound("unknown model 'x'", field="model"), 404, "model_not_found", "model"),
             (errors.InvalidInput("too long", field="sampling.max_tokens"), 400, "invalid_value", "max_tokens"),
             (errors.InvalidInput("set one", field="prompt"), 400, "invalid_value", "messages"),
             (errors.InvalidInput("x", field="tags", reason="CONTEXT_LENGTH_EXCEEDED"), 400,
              "context_length_exceeded", "tags")]
    for error, status, code, param in cases:
        app = build_app(FakeBackend(FakeGateway(error=error)))  # type: ignore[arg-type]
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://router") as client:
            answer = await client.post("/v1/chat/completions", json=CHAT, headers={"authorization": f"Bearer {KEY}"})
        assert answer.status_code == status
        assert (answer.json()["error"]["code"], answer.json()["error"]["param"]) == (code, param)
