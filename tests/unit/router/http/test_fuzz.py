"""Random JSON, wrong types and random bytes at the HTTP API: every answer is a 200 or a 4xx with an
OpenAI error body — never a 500, never a traceback."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.router.http.app import build_app
from tests.unit.router.http.fakes import KEY, FakeBackend, FakeGateway

JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
                    max_leaves=12)
FIELDS = st.sampled_from(["model", "messages", "prompt", "max_tokens", "max_completion_tokens", "temperature", "top_p",
                          "n", "stream", "stream_options", "stop", "seed", "user", "tags", "cache_policy", "tools",
                          "response_format", "logprobs", "presence_penalty", "context_id", "traffic_class", "echo"])
BODIES = st.one_of(
    JSON,
    st.dictionaries(FIELDS, JSON, max_size=6).map(
        lambda d: {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "prompt": "hi", **d}),
)


def ask(path: str, content: bytes) -> httpx.Response:
    async def call() -> httpx.Response:
        app = build_app(FakeBackend(FakeGateway()))  # type: ignore[arg-type]
        transport = httpx.ASGITransport(app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://router") as client:
            return await client.post(path, content=content, headers={"authorization": f"Bearer {KEY}",
                                                                     "content-type": "application/json"})

    return asyncio.run(call())


def check(answer: httpx.Response) -> None:
    assert answer.status_code == 200 or 400 <= answer.status_code < 500, answer.text
    if answer.status_code != 200:
        error: dict[str, Any] = answer.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"]
        assert "Traceback" not in answer.text


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(body=BODIES, path=st.sampled_from(["/v1/chat/completions", "/v1/completions"]))
def test_random_json_never_gets_a_500(body: object, path: str) -> None:
    if isinstance(body, dict):  # a valid base for the endpoint, with random fields over it
        body.pop("prompt" if path.endswith("/chat/completions") else "messages", None)
    check(ask(path, json.dumps(body).encode()))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(content=st.binary(max_size=64), path=st.sampled_from(["/v1/chat/completions", "/v1/completions"]))
def test_random_bytes_never_get_a_500(content: bytes, path: str) -> None:
    check(ask(path, content))


def test_text_that_is_not_unicode_is_a_400_naming_where() -> None:
    for content in (b'{"model": "tiny", "messages": [{"role": "user", "content": "\xed\xa0\x80"}]}',  # CESU bytes
                    b'{"model": "tiny", "messages": [{"role": "user", "content": "a\\udc00"}]}'):  # escaped
        answer = ask("/v1/chat/completions", content)
        check(answer)
        assert answer.status_code == 400 and "messages[0].content is not valid Unicode" in answer.json()["error"]["message"]
    answer = ask("/v1/completions", b'{"model": "tiny", "prompt": "\xff\xfe"}')
    assert answer.status_code == 400 and answer.json()["error"]["code"] == "invalid_json"
