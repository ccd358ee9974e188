"""A client that goes away closes the gateway's stream: over a real socket (uvicorn, httptools), the
fake gateway's `finally` runs while its generation is still waiting for its next token."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import httpx
import pytest

from services.router.http.app import build_app
from services.router.http.serve import HttpServer, start_http
from tests.unit.router.http.fakes import KEY, FakeBackend, FakeGateway

AUTH = {"authorization": f"Bearer {KEY}", "x-request-id": "gone-1"}
CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture
async def held() -> AsyncIterator[tuple[FakeGateway, HttpServer]]:
    gateway = FakeGateway(words=tuple(f"w{i} " for i in range(50)), hold=asyncio.Event())
    server = await start_http(build_app(FakeBackend(gateway)), "127.0.0.1", 0)  # type: ignore[arg-type]
    try:
        yield gateway, server
    finally:
        gateway.hold.set()  # type: ignore[union-attr]
        await server.stop()


async def wait_closed(gateway: FakeGateway, request_id: str, deadline_s: float = 10) -> None:
    async with asyncio.timeout(deadline_s):
        await gateway.stream_closed.wait()
    assert gateway.closed == [request_id]


async def test_a_stream_closed_by_the_client_closes_the_gateway_iterator(held) -> None:  # type: ignore[no-untyped-def]
    gateway, server = held
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}") as client:
        async with client.stream("POST", "/v1/chat/completions", json={**CHAT, "stream": True}, headers=AUTH) as answer:
            assert answer.status_code == 200
            async for line in answer.aiter_lines():
                if "w0" in line:
                    break  # one token seen; the generation now waits for its next one
    await wait_closed(gateway, "gone-1")
    assert gateway.delivered["gone-1"] == 1


async def test_a_non_streamed_request_whose_client_left_is_cancelled(held) -> None:  # type: ignore[no-untyped-def]
    gateway, server = held
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}") as client:
        request = asyncio.create_task(client.post("/v1/chat/completions", json=CHAT, headers=AUTH))
        async with asyncio.timeout(10):
            await gateway.token_sent.wait()
        request.cancel()  # closes the connection
        with pytest.raises(asyncio.CancelledError):
            await request
    await wait_closed(gateway, "gone-1")
