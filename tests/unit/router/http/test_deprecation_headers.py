"""A request pinned to a DEPRECATED version is answered with the deprecation headers, JSON and SSE alike;
an unpinned one is not."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime

import httpx
import pytest

from services.router.http.app import HttpSettings, build_app
from services.router.lifecycle import Deprecation
from tests.unit.router.http.fakes import KEY, FakeBackend, FakeGateway

AUTH = {"authorization": f"Bearer {KEY}"}
SINCE = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)


@pytest.fixture
def gateway() -> FakeGateway:
    return FakeGateway(deprecated=Deprecation("tiny@v1", SINCE))


@pytest.fixture
async def client(gateway: FakeGateway) -> AsyncIterator[httpx.AsyncClient]:
    app = build_app(FakeBackend(gateway), HttpSettings(max_body_bytes=64 * 1024))  # type: ignore[arg-type]
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app, raise_app_exceptions=False),
                                 base_url="http://router") as http:
        yield http


async def test_a_request_pinned_to_a_deprecated_version_gets_the_deprecation_headers(
        client: httpx.AsyncClient) -> None:
    chat = {"model": "tiny@v1", "messages": [{"role": "user", "content": "hi"}]}
    answer = await client.post("/v1/chat/completions", json=chat, headers=AUTH)
    assert answer.status_code == 200
    assert answer.headers["deprecation"] == f"@{int(SINCE.timestamp())}"
    assert "tiny@v1 is DEPRECATED since 2026-12-01T12:00:00+00:00" in answer.headers["x-autoglm-deprecation"]
    async with client.stream("POST", "/v1/completions", json={"model": "tiny@v1", "prompt": "Once", "stream": True},
                             headers=AUTH) as streamed:
        assert streamed.status_code == 200 and streamed.headers["deprecation"].startswith("@")
        assert [line async for line in streamed.aiter_lines() if line][-1] == "data: [DONE]"
    unpinned = await client.post("/v1/chat/completions", json={**chat, "model": "tiny"}, headers=AUTH)
    assert unpinned.status_code == 200 and "deprecation" not in unpinned.headers
    assert "x-autoglm-deprecation" not in unpinned.headers
