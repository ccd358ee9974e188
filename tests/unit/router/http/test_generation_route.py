"""The generation endpoints' own request handling (`GenerationRoute`) answers as FastAPI's generic handler
does: JSON parsed by content type before the caller is authenticated, the caller authenticated before
the body is validated, the same 400 bodies; and a non-streamed answer runs its generation in the
request's own task, closing the gateway's stream when the client hangs up."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, MutableMapping
from typing import Any

import httpx
import pytest
from fastapi import APIRouter, FastAPI

from services.router.http.app import build_app
from services.router.http.route import GenerationRoute, is_json
from tests.unit.router.http.fakes import KEY, FakeBackend, FakeGateway

AUTH = {"authorization": f"Bearer {KEY}"}
CHAT = b'{"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}'


@pytest.fixture
def gateway() -> FakeGateway:
    return FakeGateway()


@pytest.fixture
async def client(gateway: FakeGateway) -> AsyncIterator[httpx.AsyncClient]:
    app = build_app(FakeBackend(gateway))  # type: ignore[arg-type]
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app, raise_app_exceptions=False),
                                 base_url="http://router") as http:
        yield http


async def post(client: httpx.AsyncClient, content: bytes, headers: dict[str, str]) -> tuple[int, dict[str, Any]]:
    answer = await client.post("/v1/chat/completions", content=content, headers=headers)
    return answer.status_code, answer.json()["error"] if answer.status_code != 200 else answer.json()


async def test_malformed_json_is_refused_before_the_caller_is_authenticated(client: httpx.AsyncClient) -> None:
    status, error = await post(client, b"{not json", {"content-type": "application/json"})
    assert status == 400 and error["code"] == "invalid_json" and "not valid JSON" in error["message"]


async def test_the_caller_is_authenticated_before_the_body_is_validated(client: httpx.AsyncClient) -> None:
    status, error = await post(client, b'{"model": ""}', {"content-type": "application/json"})
    assert status == 401 and error["code"] == "invalid_api_key"


@pytest.mark.parametrize(("content", "content_type", "message"), [
    (b"", "application/json", "the request body is required (a JSON object)"),
    (b"null", "application/json", "the request body must be a JSON object"),
    (CHAT, "text/plain", "the request body must be a JSON object"),
    (CHAT, "", "the request body must be a JSON object"),
])
async def test_a_missing_or_non_json_body_is_a_400_saying_so(client: httpx.AsyncClient, content: bytes,
                                                              content_type: str, message: str) -> None:
    headers = {**AUTH, "content-type": content_type} if content_type else AUTH
    status, error = await post(client, content, headers)
    assert status == 400 and error["type"] == "invalid_request_error" and error["message"].startswith(message)


@pytest.mark.parametrize("content_type", ["application/json", "application/json; charset=utf-8",
                                          "Application/JSON", "application/vnd.autoglm+json"])
async def test_every_json_content_type_is_read(client: httpx.AsyncClient, content_type: str) -> None:
    status, body = await post(client, CHAT, {**AUTH, "content-type": content_type})
    assert status == 200 and body["choices"][0]["message"]["content"] == "Hello world"


def test_is_json_reads_content_types_as_fastapi_does() -> None:
    assert is_json("application/json") and is_json(" application/problem+json ; q=1")
    assert not is_json("application/jsonx") and not is_json("text/json") and not is_json("application/json/x")


def test_a_route_of_another_shape_is_refused_when_the_app_is_built() -> None:
    router = APIRouter(route_class=GenerationRoute)

    async def other(request: Any) -> None: ...

    with pytest.raises(TypeError, match="takes \\(body, request: Request, caller: Caller\\)"):
        router.add_api_route("/other", other, methods=["POST"])
        FastAPI().include_router(router)


async def test_a_client_that_hangs_up_closes_the_generation_in_its_own_task(gateway: FakeGateway) -> None:
    gateway.hold = asyncio.Event()  # the generation waits after its first chunk
    app = build_app(FakeBackend(gateway))  # type: ignore[arg-type]
    sent = asyncio.Event()
    body = {"type": "http.request", "body": CHAT, "more_body": False}
    answers: list[MutableMapping[str, Any]] = []

    async def receive() -> dict[str, Any]:
        if not sent.is_set():
            sent.set()
            return body
        await gateway.token_sent.wait()  # the client hangs up once the generation is under way
        return {"type": "http.disconnect"}

    async def send(message: MutableMapping[str, Any]) -> None:
        answers.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
             "scheme": "http", "path": "/v1/chat/completions", "raw_path": b"/v1/chat/completions",
             "root_path": "", "query_string": b"", "server": ("router", 80), "client": ("127.0.0.1", 1),
             "headers": [(b"content-type", b"application/json"), (b"authorization", f"Bearer {KEY}".encode())]}
    tasks_before = len(asyncio.all_tasks())
    await asyncio.wait_for(app(scope, receive, send), 10)
    assert gateway.closed == [gateway.calls[0][0].request_id]  # the stream's finally ran: billed as cancelled
    assert len(asyncio.all_tasks()) == tasks_before  # no pump or watcher task left behind
    assert answers[0]["status"] == 499
