"""The HTTP routes over an in-process ASGI client and a fake gateway: wire format field for field, n
generations, ids and tags reaching the gateway, models, health, and error bodies for bad requests."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest

from services.router.http.app import HttpSettings, build_app
from services.router.input_limits import InputLimits
from services.router.types import Summary
from tests.unit.router.http.fakes import KEY, FakeBackend, FakeGateway

AUTH = {"authorization": f"Bearer {KEY}"}
CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture
def gateway() -> FakeGateway:
    return FakeGateway()


@pytest.fixture
async def client(gateway: FakeGateway) -> AsyncIterator[httpx.AsyncClient]:
    app = build_app(FakeBackend(gateway), HttpSettings(max_body_bytes=64 * 1024))  # type: ignore[arg-type]
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app, raise_app_exceptions=False),
                                 base_url="http://router") as http:
        yield http


async def test_chat_completion_wire_format(client: httpx.AsyncClient) -> None:
    answer = await client.post("/v1/chat/completions", json=CHAT, headers=AUTH)
    assert answer.status_code == 200
    body = answer.json()
    assert set(body) == {"id", "object", "created", "model", "choices", "usage", "model_version",
                         "system_fingerprint"}
    assert body["object"] == "chat.completion" and isinstance(body["created"], int)
    assert body["id"] == f"chatcmpl-{answer.headers['x-request-id']}"
    assert body["choices"] == [{"index": 0, "message": {"role": "assistant", "content": "Hello world"},
                                "finish_reason": "stop", "logprobs": None}]
    assert body["usage"] == {"prompt_tokens": 2, "completion_tokens": 2, "total_tokens": 4,
                             "cost": {"currency": "USD", "micros": 20}, "cached": False}
    assert (body["model"], body["model_version"]) == ("tiny", "v1")


async def test_completion_wire_format(client: httpx.AsyncClient, gateway: FakeGateway) -> None:
    answer = await client.post("/v1/completions", json={"model": "tiny", "prompt": "Once", "max_tokens": 3},
                               headers=AUTH)
    body = answer.json()
    assert answer.status_code == 200 and body["object"] == "text_completion"
    assert body["choices"] == [{"index": 0, "text": "Hello world", "finish_reason": "stop", "logprobs": None}]
    (_, request), = gateway.calls
    assert (request.prompt, request.raw_prompt, request.sampling.max_tokens) == ("Once", True, 3)


async def test_n_runs_n_generations_each_with_its_own_request_id(client: httpx.AsyncClient,
                                                                 gateway: FakeGateway) -> None:
    answer = await client.post("/v1/chat/completions", json={**CHAT, "n": 3}, headers={**AUTH, "x-request-id": "r-9"})
    body = answer.json()
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    assert sorted(ctx.request_id for ctx, _ in gateway.calls) == ["r-9", "r-9.1", "r-9.2"]
    assert body["usage"]["completion_tokens"] == 6 and body["usage"]["cost"]["micros"] == 60


async def test_ids_trace_and_tags_reach_the_gateway_and_come_back(client: httpx.AsyncClient,
                                                                   gateway: FakeGateway) -> None:
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    answer = await client.post(
        "/v1/chat/completions", json={**CHAT, "user": "u-7", "tags": {"team": "search"}},
        headers={**AUTH, "x-request-id": "req-1", "traceparent": f"00-{trace_id}-00f067aa0ba902b7-01",
                 "x-autoglm-tags": "env=prod,team=web"})
    assert answer.headers["x-request-id"] == "req-1"
    assert answer.headers["traceparent"].startswith(f"00-{trace_id}-")
    (ctx, _), = gateway.calls
    assert (ctx.request_id, ctx.trace_id) == ("req-1", trace_id)
    assert ctx.tags == {"env": "prod", "team": "search", "user": "u-7"}


async def test_a_streamed_chat_is_sse_ending_with_done(client: httpx.AsyncClient) -> None:
    async with client.stream("POST", "/v1/chat/completions", json={**CHAT, "stream": True}, headers=AUTH) as answer:
        assert answer.status_code == 200
        assert answer.headers["content-type"].startswith("text/event-stream")
        lines = [line async for line in answer.aiter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    assert '"role":"assistant"' in lines[0] and '"finish_reason":"stop"' in lines[-2]


async def test_models_list_and_get(client: httpx.AsyncClient) -> None:
    listed = (await client.get("/v1/models", headers=AUTH)).json()
    assert listed["object"] == "list" and [m["id"] for m in listed["data"]] == ["tiny"]
    card = (await client.get("/v1/models/tiny", headers=AUTH)).json()
    assert card["versions"] == [{"version": "v1", "weight_permille": 1000, "stable": True, "healthy_replicas": 1,
                                 "default_sampling": {"temperature": 0.2, "top_p": 0.9, "top_k": None,
                                                      "repetition_penalty": None},
                                 "state": "ACTIVE"}]
    missing = await client.get("/v1/models/absent", headers=AUTH)
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"


async def test_health_and_ready_are_open(client: httpx.AsyncClient) -> None:
    assert (await client.get("/health")).json() == {"status": "ok"}
    assert (await client.get("/ready")).status_code == 200
    assert (await client.get("/v1/models")).status_code == 401


@pytest.mark.parametrize(("method", "path", "kwargs", "status"), [
    ("POST", "/v1/chat/completions", {"content": b"{not json", "headers": {"content-type": "application/json"}}, 400),
    ("POST", "/v1/chat/completions", {"json": [1, 2]}, 400),
    ("POST", "/v1/chat/completions", {"json": {**CHAT, "messages": "x" * 70_000}}, 413),
    ("POST", "/v1/chat/completions", {"content": b"\xff\xfe", "headers": {"content-type": "application/json"}}, 400),
    ("GET", "/v1/chat/completions", {}, 405),
    ("GET", "/v1/nothing-here", {}, 404),
])
async def test_bad_requests_get_openai_error_bodies(client: httpx.AsyncClient, method: str, path: str,
                                                    kwargs: dict[str, object], status: int) -> None:
    headers = {**AUTH, **kwargs.pop("headers", {})}  # type: ignore[dict-item]
    answer = await client.request(method, path, headers=headers, **kwargs)  # type: ignore[arg-type]
    assert answer.status_code == status
    error = answer.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]


async def test_a_generation_that_ends_in_error_is_not_a_200(client: httpx.AsyncClient, gateway: FakeGateway) -> None:
    from services.common.generation import FinishReason

    original = gateway.generate

    async def failing(ctx, req):  # type: ignore[no-untyped-def]
        async for item in original(ctx, req):
            if isinstance(item, Summary):
                item = Summary(FinishReason.ERROR, item.usage, item.cost, item.model, item.model_version, "", 0)
            yield item

    gateway.generate = failing  # type: ignore[method-assign]
    answer = await client.post("/v1/chat/completions", json=CHAT, headers=AUTH)
    assert answer.status_code == 503 and answer.json()["error"]["type"] == "server_error"


def test_openapi_publishes_the_wire_models() -> None:
    schema = build_app(FakeBackend(FakeGateway())).openapi()  # type: ignore[arg-type]
    assert {"/v1/chat/completions", "/v1/completions", "/v1/models"} <= set(schema["paths"])
    assert "ChatCompletionRequest" in schema["components"]["schemas"]


async def test_a_body_sent_without_a_length_is_cut_off_at_the_limit(client: httpx.AsyncClient) -> None:
    async def body() -> AsyncIterator[bytes]:
        yield b'{"model": "tiny", "messages": "'
        for _ in range(100):
            yield b"x" * 1024

    answer = await client.post("/v1/chat/completions", content=body(),
                               headers={**AUTH, "content-type": "application/json"})
    assert answer.status_code == 413 and answer.json()["error"]["type"] == "invalid_request_error"


async def test_a_prompt_over_the_routers_prompt_limit_is_refused_naming_it(gateway: FakeGateway) -> None:
    app = build_app(FakeBackend(gateway, InputLimits(max_prompt_bytes=1000)))  # type: ignore[arg-type]
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://router") as http:
        chat = await http.post("/v1/chat/completions", headers=AUTH, json={
            "model": "tiny", "messages": [{"role": "user", "content": "x" * 600}, {"role": "user", "content": "y" * 600}]})
        completion = await http.post("/v1/completions", headers=AUTH, json={"model": "tiny", "prompt": "z" * 1001})
    for answer in (chat, completion):
        assert answer.status_code == 400
        error = answer.json()["error"]
        assert "max_prompt_bytes" in error["message"] and "1,000" in error["message"]
    assert chat.json()["error"]["param"] == "messages[0].content"
    assert gateway.calls == []  # refused before the gateway did any work
