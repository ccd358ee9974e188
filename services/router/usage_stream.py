"""Usage events to billing in batches, over one long-lived StreamUsage stream.

`submit` queues an event and returns a future that billing's ack resolves: with the cost billing
committed, or with the domain error it rejected the event with. Billing acks an event only after its
commit and counts an event id once, so a resend is harmless: every event not acked yet stays in the
outbox, and after a broken stream (billing killed, a sidecar gone) the next connection sends all of them
again, oldest first. A second `submit` of an event still in the outbox returns the same future.

The writer sends whatever has queued since its previous message (up to `max_batch` events per message),
so batches grow with the load by themselves and an idle router holds one quiet stream. `reachable` hears
of every ack (True) and every transport failure (False): the meter's view of whether billing is down.
No grpc here: the port opens the stream (`billing_client.GrpcUsageStream`).
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import structlog

from services.common.errors import DomainError, PeerUnreachable
from services.router.ports import UsageRecord
from services.router.types import Money

log = structlog.get_logger(__name__)

Ack = tuple[str, Money | DomainError]  # event id, then the cost committed or why it was rejected


class UsageChannel(Protocol):
    async def send(self, events: Sequence[UsageRecord]) -> None: ...

    async def receive(self) -> list[Ack] | None:
        """The acks of one message billing answered, in order; None once the stream has ended."""
        ...

    async def close(self) -> None: ...


class UsageStreamPort(Protocol):
    async def open_usage_stream(self) -> UsageChannel: ...


@dataclass
class _Pending:
    usage: UsageRecord
    future: asyncio.Future[Money]


class UsageStream:
    def __init__(self, port: UsageStreamPort, max_batch: int = 500, reachable: Callable[[bool], None] | None = None,
                 backoff_s: tuple[float, float] = (0.2, 2.0)) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        self._port = port
        self._max_batch = max_batch
        self.reachable = reachable  # the meter's view of billing (set by it)
        self._backoff_s = backoff_s
        self._outbox: OrderedDict[str, _Pending] = OrderedDict()  # event id -> not acked yet, oldest first
        self._unsent: deque[str] = deque()  # event ids not written on the current stream
        self._work = asyncio.Event()
        self._idle = asyncio.Event()  # set while the outbox is empty
        self._idle.set()
        self._closed = False
        self.messages = 0  # messages sent (for metrics and the bench)
        self.connections = 0

    def _tell(self, up: bool) -> None:
        if self.reachable is not None:
            self.reachable(up)

    def __len__(self) -> int:
        """Events not acked yet."""
        return len(self._outbox)

    def submit(self, usage: UsageRecord) -> asyncio.Future[Money]:
        pending = self._outbox.get(usage.event_id)
        if pending is not None:
            return pending.future
        future: asyncio.Future[Money] = asyncio.get_running_loop().create_future()
        if self._closed:  # shutting down: the event stays in the journal or spool for the next start
            future.cancel()
            return future
        self._outbox[usage.event_id] = _Pending(usage, future)
        self._idle.clear()
        self._unsent.append(usage.event_id)
        self._work.set()
        return future

    async def close(self, wait_s: float) -> None:
        """At shutdown: wait up to `wait_s` for the outbox to empty, then cancel what is left (those events
        stay journaled or spooled and are sent at the next start)."""
        try:
            await asyncio.wait_for(self._idle.wait(), wait_s)
        except TimeoutError:
            log.warning("usage_stream_closed_unacked", unacked=len(self._outbox))
        self._closed = True
        while self._outbox:
            _, pending = self._outbox.popitem(last=False)
            pending.future.cancel()
        self._idle.set()

    async def run_forever(self) -> None:
        """Background task: keep a stream open while there is anything to send, reconnecting with backoff."""
        delay = self._backoff_s[0]
        while True:
            if not self._outbox:
                self._work.clear()
                await self._work.wait()
            try:
                await self._connection()
            except DomainError as exc:
                if isinstance(exc, PeerUnreachable):
                    self._tell(False)
                log.warning("usage_stream_broken", reason=exc.reason, unacked=len(self._outbox), retry_in_s=delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, self._backoff_s[1])
            else:
                delay = self._backoff_s[0]

    async def _connection(self) -> None:
        channel = await self._port.open_usage_stream()
        self.connections += 1
        self._unsent = deque(self._outbox)  # everything not acked goes again, oldest first
        writer = asyncio.create_task(self._write(channel))
        reader = asyncio.create_task(self._read(channel))
        try:
            done, _ = await asyncio.wait({writer, reader}, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                task.result()  # a transport failure raises here
            raise PeerUnreachable("billing ended the usage stream")
        finally:
            for task in (writer, reader):
                task.cancel()
            await asyncio.gather(writer, reader, return_exceptions=True)
            await channel.close()

    async def _write(self, channel: UsageChannel) -> None:
        while True:
            batch: list[UsageRecord] = []
            while self._unsent and len(batch) < self._max_batch:
                pending = self._outbox.get(self._unsent.popleft())
                if pending is not None:
                    batch.append(pending.usage)
            if batch:
                await channel.send(batch)
                self.messages += 1
                continue
            self._work.clear()
            await self._work.wait()

    async def _read(self, channel: UsageChannel) -> None:
        while (acks := await channel.receive()) is not None:
            for event_id, outcome in acks:
                pending = self._outbox.pop(event_id, None)
                if pending is None or pending.future.done():
                    continue
                if isinstance(outcome, DomainError):
                    pending.future.set_exception(outcome)
                else:
                    pending.future.set_result(outcome)
            if not self._outbox:
                self._idle.set()
            self._tell(True)
