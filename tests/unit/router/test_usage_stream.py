"""The router's batched usage stream over a fake billing stream: events queued together go in one message,
each future resolves at its ack (after billing's commit), a broken stream is reopened and every unacked
event sent again (billing counts an event id once), a rejected event fails its future with billing's
error, and closing cancels what is left (it stays journaled)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from datetime import UTC, datetime

import pytest

from services.common.errors import DomainError, InvalidInput, PeerUnreachable
from services.common.generation import TrafficClass
from services.common.usage import UsageStatus
from services.router.ports import UsageRecord
from services.router.types import Money
from services.router.usage_stream import Ack, UsageStream
from tests.waiting import wait_until


class Ledger:
    """Billing's side: commits each event id once; can ack nothing after committing (then break)."""

    def __init__(self) -> None:
        self.up = True
        self.committed: dict[str, int] = {}
        self.messages: list[list[str]] = []
        self.lose_acks = False  # commit, then break the stream before acking
        self.reject: set[str] = set()
        self.opened = 0

    async def open_usage_stream(self) -> Channel:
        if not self.up:
            raise PeerUnreachable("billing is unreachable")
        self.opened += 1
        return Channel(self)


class Channel:
    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger
        self.replies: asyncio.Queue[list[Ack] | Exception | None] = asyncio.Queue()

    async def send(self, events: Sequence[UsageRecord]) -> None:
        self.ledger.messages.append([e.event_id for e in events])
        acks: list[Ack] = []
        for event in events:
            if event.event_id in self.ledger.reject:
                acks.append((event.event_id, InvalidInput("model is not priced", field="event.model")))
                continue
            self.ledger.committed.setdefault(event.event_id, 10 * event.completion_tokens)
            acks.append((event.event_id, Money("USD", self.ledger.committed[event.event_id])))
        if self.ledger.lose_acks:
            self.ledger.lose_acks = False
            await self.replies.put(PeerUnreachable("connection reset"))
            return
        await self.replies.put(acks)

    async def receive(self) -> list[Ack] | None:
        reply = await self.replies.get()
        if isinstance(reply, Exception):
            raise reply
        return reply

    async def close(self) -> None:
        pass


def usage(i: int) -> UsageRecord:
    now = datetime.now(UTC)
    return UsageRecord(event_id=f"e{i}", tenant_id="acme", api_key_id="k1", model="m", model_version="v1", tags={},
                       prompt_tokens=3, completion_tokens=i, cached=False, request_id=f"e{i}", trace_id="t",
                       start_time=now, end_time=now, status=UsageStatus.COMPLETED,
                       traffic_class=TrafficClass.INTERACTIVE)


async def running(stream: UsageStream) -> asyncio.Task[None]:
    return asyncio.create_task(stream.run_forever())


async def stop(task: asyncio.Task[None]) -> None:
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


async def test_events_queued_together_go_in_one_message_and_resolve_at_their_ack() -> None:
    ledger, seen = Ledger(), []
    stream = UsageStream(ledger, max_batch=50, reachable=seen.append)
    futures = [stream.submit(usage(i)) for i in range(120)]
    assert stream.submit(usage(7)) is futures[7]  # the same event again: the same future
    task = await running(stream)
    try:
        costs = await asyncio.wait_for(asyncio.gather(*futures), 10)
    finally:
        await stop(task)
    assert costs == [Money("USD", 10 * i) for i in range(120)]
    assert [len(m) for m in ledger.messages] == [50, 50, 20]
    assert ledger.opened == 1 and len(stream) == 0 and seen and all(seen)


async def test_a_broken_stream_resends_every_unacked_event_and_billing_counts_each_once() -> None:
    ledger, seen = Ledger(), []
    stream = UsageStream(ledger, reachable=seen.append, backoff_s=(0.01, 0.02))
    ledger.lose_acks = True  # the first message is committed, its acks never arrive
    first = [stream.submit(usage(i)) for i in range(5)]
    task = await running(stream)
    try:
        await wait_until(lambda: ledger.messages, 10, "the first message")
        later = [stream.submit(usage(i)) for i in range(5, 8)]
        costs = await asyncio.wait_for(asyncio.gather(*first, *later), 10)
    finally:
        await stop(task)
    assert costs == [Money("USD", 10 * i) for i in range(8)]
    assert sorted(ledger.committed) == sorted(f"e{i}" for i in range(8))  # none missing, none doubled
    assert ledger.opened == 2
    assert ledger.messages[1][:5] == [f"e{i}" for i in range(5)]  # the unacked ones first, in order
    assert False in seen and seen[-1] is True


async def test_billing_down_keeps_the_events_until_it_returns() -> None:
    ledger, seen = Ledger(), []
    ledger.up = False
    stream = UsageStream(ledger, reachable=seen.append, backoff_s=(0.01, 0.02))
    future = stream.submit(usage(1))
    task = await running(stream)
    try:
        await wait_until(lambda: False in seen, 10, "the stream finding billing unreachable")
        assert not future.done() and len(stream) == 1
        ledger.up = True
        assert await asyncio.wait_for(future, 10) == Money("USD", 10)
    finally:
        await stop(task)
    assert ledger.committed == {"e1": 10}


async def test_a_rejected_event_fails_its_future_with_billings_error_and_spares_the_others() -> None:
    ledger = Ledger()
    ledger.reject.add("e2")
    stream = UsageStream(ledger)
    futures = [stream.submit(usage(i)) for i in range(1, 4)]
    task = await running(stream)
    try:
        outcomes = await asyncio.wait_for(asyncio.gather(*futures, return_exceptions=True), 10)
    finally:
        await stop(task)
    assert outcomes[0] == Money("USD", 10) and outcomes[2] == Money("USD", 30)
    assert isinstance(outcomes[1], InvalidInput) and isinstance(outcomes[1], DomainError)


async def test_closing_cancels_what_billing_has_not_acked() -> None:
    ledger = Ledger()
    ledger.up = False
    stream = UsageStream(ledger, backoff_s=(0.01, 0.02))
    future = stream.submit(usage(1))
    task = await running(stream)
    try:
        await stream.close(0.05)
    finally:
        await stop(task)
    assert future.cancelled() and stream.submit(usage(2)).cancelled() and len(stream) == 0


def test_a_batch_must_hold_an_event() -> None:
    with pytest.raises(ValueError):
        UsageStream(Ledger(), max_batch=0)
