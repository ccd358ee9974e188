"""A TLS-passthrough TCP balancer: one listening port in front of several copies of a service that
terminate TLS themselves (the routers' HTTPS API), each connection handed to the backend with the fewest
open connections.

The bytes are passed through unread: TLS, the HTTP API, its streaming responses and certificate renewal
stay the service's own, exactly as with one copy on the public port; a client that hangs up closes the
backend connection, so the service sees the disconnect. A backend that refuses a connection is skipped
for `down_s` and the connection goes to the next one, so a stopped copy costs a client nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import structlog

log = structlog.get_logger("sidecar.tcp_balancer")

CHUNK = 64 * 1024


@dataclass
class Backend:
    address: str
    open: int = 0  # connections passed to it and not yet closed
    down_until: float = 0.0
    total: int = 0

    @property
    def host_port(self) -> tuple[str, int]:
        host, _, port = self.address.rpartition(":")
        return host, int(port)


class TcpBalancer:
    def __init__(self, backends: Sequence[str], *, connect_timeout_s: float = 2.0, down_s: float = 2.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if not backends:
            raise ValueError("a TCP balancer needs at least one backend address")
        self.backends = [Backend(a) for a in backends]
        self.connect_timeout_s = connect_timeout_s
        self.down_s = down_s
        self._clock = clock
        self._next = 0
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()

    def order(self) -> list[Backend]:
        """Backends to try for a new connection: the ones not marked down first, fewest open connections
        first, ties taken in turn."""
        now = self._clock()
        count = len(self.backends)
        start = self._next
        self._next = (self._next + 1) % count
        ranked = sorted(range(count), key=lambda i: (self.backends[i].down_until > now, self.backends[i].open,
                                                     (i - start) % count))
        return [self.backends[i] for i in ranked]

    async def start(self, host: str, port: int) -> int:
        self._server = await asyncio.start_server(self._accept, host, port, reuse_address=True)
        return int(self._server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._connections):
            task.cancel()
        for task in list(self._connections):
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._server is not None:
            await self._server.wait_closed()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        try:
            await self._serve(reader, writer)
        finally:
            self._connections.discard(task)
            writer.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for backend in self.order():
            try:
                up_reader, up_writer = await asyncio.wait_for(
                    asyncio.open_connection(*backend.host_port), self.connect_timeout_s)
            except (OSError, TimeoutError) as exc:
                backend.down_until = self._clock() + self.down_s
                log.warning("tcp_backend_unreachable", backend=backend.address, error=str(exc) or type(exc).__name__)
                continue
            backend.open += 1
            backend.total += 1
            try:
                await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
            finally:
                backend.open -= 1
                up_writer.close()
            return
        log.error("tcp_no_backend", backends=[b.address for b in self.backends])


async def _pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
    """Copy until end of stream, then half-close the sink; a reset on either side closes the sink."""
    try:
        while data := await source.read(CHUNK):
            sink.write(data)
            await sink.drain()
        if sink.can_write_eof():
            sink.write_eof()
    except (ConnectionError, OSError):
        sink.close()
