"""The benchmark's HTTP client: one keep-alive HTTP/1.1 connection on asyncio streams, parsed by httptools
(the parser uvicorn uses). It does as little as a client can, and the same for every server, so that what
the figures show is the servers' cost, not a client library's. Streamed answers are Server-Sent Events:
`sse_events` turns the body pieces into the JSON objects of the `data:` lines.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httptools


class _Message:
    """httptools callbacks of one response."""

    def __init__(self) -> None:
        self.pieces: list[bytes] = []
        self.complete = False
        self.keep_alive = False
        self.parser: httptools.HttpResponseParser | None = None

    def on_headers_complete(self) -> None:
        # Asked here: once the message is complete, httptools' should_keep_alive() says False for every
        # answer (the connection was then closed and reopened for each request).
        assert self.parser is not None
        self.keep_alive = self.parser.should_keep_alive()

    def on_body(self, body: bytes) -> None:
        self.pieces.append(body)

    def on_message_complete(self) -> None:
        self.complete = True


class Connection:
    """POST JSON to one server over one kept-alive connection (reopened when the server closes it)."""

    def __init__(self, host: str, port: int, token: str = "") -> None:
        self.host, self.port = host, port
        self._head = f"Host: {host}:{port}\r\nContent-Type: application/json\r\n"
        if token:
            self._head += f"Authorization: Bearer {token}\r\n"
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def _send(self, path: str, body: dict[str, Any]) -> tuple[asyncio.StreamReader, _Message,
                                                                     httptools.HttpResponseParser]:
        # A kept-alive connection the server has since closed (idle longer than its keep-alive timeout,
        # e.g. while another server's round ran) is replaced before the request is written.
        if self._writer is None or self._writer.is_closing() or self._reader is None or self._reader.at_eof():
            await self.close()
            self._reader, self._writer = await asyncio.open_connection(self.host, self.port)
        data = json.dumps(body).encode()
        self._writer.write(f"POST {path} HTTP/1.1\r\n{self._head}Content-Length: {len(data)}\r\n\r\n".encode() + data)
        message = _Message()
        assert self._reader is not None
        message.parser = httptools.HttpResponseParser(message)
        return self._reader, message, message.parser

    async def stream(self, path: str, body: dict[str, Any]) -> AsyncIterator[tuple[int, bytes]]:
        """(status, body piece) as the pieces arrive."""
        reader, message, parser = await self._send(path, body)
        try:
            while not message.complete:
                data = await reader.read(65536)
                if not data:
                    raise ConnectionError(f"{self.host}:{self.port} closed the connection mid-answer")
                parser.feed_data(data)
                while message.pieces:
                    yield parser.get_status_code(), message.pieces.pop(0)
        except BaseException:
            await self.close()
            raise
        if not message.keep_alive:
            await self.close()

    async def post(self, path: str, body: dict[str, Any]) -> tuple[int, bytes]:
        code, pieces = 0, []
        async for code, piece in self.stream(path, body):  # noqa: B007 (the last piece's status is the answer's)
            pieces.append(piece)
        return code, b"".join(pieces)

    async def get(self, path: str) -> int:
        """A one-off GET on its own connection (readiness checks); the status, 0 when unreachable."""
        try:
            reader, writer = await asyncio.open_connection(self.host, self.port)
        except OSError:
            return 0
        try:
            writer.write(f"GET {path} HTTP/1.1\r\n{self._head}Connection: close\r\n\r\n".encode())
            message = _Message()
            parser = message.parser = httptools.HttpResponseParser(message)
            while not message.complete:
                data = await reader.read(65536)
                if not data:
                    return 0
                parser.feed_data(data)
            return int(parser.get_status_code())
        except (OSError, httptools.HttpParserError):
            return 0
        finally:
            writer.close()

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


async def sse_events(pieces: AsyncIterator[tuple[int, bytes]]) -> AsyncIterator[dict[str, Any]]:
    """The JSON objects of a Server-Sent Events body (`data: {...}` events, up to `data: [DONE]`)."""
    buffer = b""
    async for status, piece in pieces:
        if status != 200:
            raise RuntimeError(f"HTTP {status}: {piece[:300]!r}")
        buffer += piece.replace(b"\r\n", b"\n")
        *events, buffer = buffer.split(b"\n\n")
        for event in events:
            for line in event.split(b"\n"):
                if line.startswith(b"data:"):
                    data = line[5:].strip()
                    if data != b"[DONE]":
                        yield json.loads(data)


@dataclass
class StreamTiming:
    """One streamed chat completion as its client saw it."""

    ttft_s: float  # to the first chunk carrying generated text
    total_s: float
    content_chunks: int
    usage_tokens: int | None  # usage.completion_tokens, when the stream reports it
    text: str = field(repr=False)

    @property
    def tokens(self) -> int:
        return self.usage_tokens if self.usage_tokens is not None else self.content_chunks


async def timed_stream(conn: Connection, body: dict[str, Any]) -> StreamTiming:
    start = time.perf_counter()
    first = 0.0
    chunks, usage, text = 0, None, []
    async for event in sse_events(conn.stream("/v1/chat/completions", {**body, "stream": True})):
        if "error" in event:
            raise RuntimeError(f"stream error: {event['error']}")
        for choice in event.get("choices") or ():
            content = (choice.get("delta") or {}).get("content")
            if content:
                if not first:
                    first = time.perf_counter() - start
                chunks += 1
                text.append(content)
        if event.get("usage"):
            usage = event["usage"].get("completion_tokens")
    return StreamTiming(first, time.perf_counter() - start, chunks, usage, "".join(text))
