"""A response head is held until the body (one write, one segment) or the end of the loop iteration (a
stream's head); the bytes leave in order and a close sends what is held first. Then over a real socket:
uvicorn with this protocol answers a JSON request and a stream whole."""

from __future__ import annotations

import asyncio
from typing import Any

from services.router.http.app import build_app
from services.router.http.coalesce import HeadHoldingTransport
from services.router.http.serve import start_http
from tests.unit.router.http.fakes import KEY, FakeBackend, FakeGateway
from tests.waiting import wait_until


class Recording:
    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        self.writes.append(data)

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 1) if name == "peername" else default


async def test_a_head_and_its_body_go_out_in_one_write() -> None:
    real = Recording()
    transport = HeadHoldingTransport(real)  # type: ignore[arg-type]
    transport.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n")
    assert real.writes == []
    transport.write(b"{}")
    assert real.writes == [b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}"]
    await asyncio.sleep(0)  # the end-of-iteration flush finds nothing left
    assert len(real.writes) == 1 and transport.get_extra_info("peername") == ("127.0.0.1", 1)


async def test_a_head_alone_leaves_at_the_end_of_the_iteration_and_a_close_flushes_first() -> None:
    real = Recording()
    transport = HeadHoldingTransport(real)  # type: ignore[arg-type]
    transport.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
    await wait_until(lambda: len(real.writes) == 1, 5, "the held head was written")
    transport.write(b"5\r\nhello\r\n")
    assert real.writes[1] == b"5\r\nhello\r\n"
    transport.write(b"HTTP/1.1 408 Request Timeout\r\ncontent-length: 0\r\n\r\n")
    transport.close()
    assert real.writes[2].startswith(b"HTTP/1.1 408") and real.closed


async def exchange(port: int, request: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        return await asyncio.wait_for(reader.read(-1), 10)  # the request says connection: close
    finally:
        writer.close()


async def test_uvicorn_with_this_protocol_answers_json_and_streams_whole() -> None:
    server = await start_http(build_app(FakeBackend(FakeGateway())), "127.0.0.1", 0)  # type: ignore[arg-type]
    try:
        for stream, ending in ((b"false", b'"system_fingerprint":null}'), (b"true", b"data: [DONE]\n\n\r\n0\r\n\r\n")):
            body = b'{"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "stream": ' + stream + b"}"
            answer = await exchange(server.port, b"POST /v1/chat/completions HTTP/1.1\r\nhost: router\r\n"
                                                 b"content-type: application/json\r\nconnection: close\r\n"
                                                 b"authorization: Bearer " + KEY.encode() + b"\r\n"
                                                 b"content-length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
            assert answer.startswith(b"HTTP/1.1 200 OK\r\n") and answer.endswith(ending), answer[-200:]
    finally:
        await server.stop()
