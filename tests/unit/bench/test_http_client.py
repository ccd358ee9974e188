"""The benchmark's HTTP client keeps its one connection open across requests (as its settings record),
and opens a new one only when the server says it closes the connection."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from bench.http.client import Connection


class Server:
    """A plain HTTP/1.1 server on a real socket answering every request `{}`, counting connections."""

    def __init__(self, close: bool, idle_close: bool = False) -> None:
        self.close = close
        self.idle_close = idle_close  # close a kept-alive connection after its answer, as an idle timeout does
        self.connections = 0
        self.port = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                              if line.lower().startswith(b"content-length:"))
                await reader.readexactly(length)
                extra = b"connection: close\r\n" if self.close else b""
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n" + extra +
                             b"\r\n{}")
                await writer.drain()
                if self.close or self.idle_close:
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


@pytest.fixture(params=[False, True], ids=["keep-alive", "close"])
async def server(request: pytest.FixtureRequest) -> AsyncIterator[Server]:
    served = Server(close=request.param)
    listening = await asyncio.start_server(served.handle, "127.0.0.1", 0)
    served.port = listening.sockets[0].getsockname()[1]
    try:
        yield served
    finally:
        listening.close()
        await listening.wait_closed()


async def test_requests_share_one_connection_unless_the_server_closes_it(server: Server) -> None:
    conn = Connection("127.0.0.1", server.port)
    try:
        for _ in range(3):
            assert await conn.post("/v1/chat/completions", {"model": "m"}) == (200, b"{}")
    finally:
        await conn.close()
    assert server.connections == (3 if server.close else 1)


async def test_a_kept_alive_connection_the_server_closed_while_idle_is_replaced() -> None:
    served = Server(close=False, idle_close=True)
    listening = await asyncio.start_server(served.handle, "127.0.0.1", 0)
    served.port = listening.sockets[0].getsockname()[1]
    conn = Connection("127.0.0.1", served.port)
    try:
        assert await conn.post("/v1/chat/completions", {"model": "m"}) == (200, b"{}")
        assert conn._reader is not None
        await asyncio.wait_for(conn._reader.read(1), 10)  # the server's close has arrived
        assert await conn.post("/v1/chat/completions", {"model": "m"}) == (200, b"{}")
    finally:
        await conn.close()
        listening.close()
        await listening.wait_closed()
    assert served.connections == 2
