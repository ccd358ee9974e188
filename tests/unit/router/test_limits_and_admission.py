"""Token buckets admit prompt + max_tokens up front, correct at the end, and tell how long to wait."""

from __future__ import annotations

import asyncio

import pytest

from services.common.errors import InvalidInput, QueueFull, RateLimited
from services.common.generation import TrafficClass
from services.router.admission import PriorityGate
from services.router.limits.token_bucket import InMemoryBuckets, RateLimiter


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


async def test_tokens_are_admitted_up_front_and_refunded_at_the_end() -> None:
    clock = Clock()
    limiter = RateLimiter(InMemoryBuckets(clock))
    first = await limiter.admit("k", 0, 600, 400)
    with pytest.raises(RateLimited) as refused:
        await limiter.admit("k", 0, 600, 400)
    # 200 left, 400 needed: 200 tokens at 10 tokens/s.
    assert refused.value.retry_after_s == pytest.approx(20.0)
    await limiter.settle(first, 600, 50)  # used 50 of 400: 350 come back
    await limiter.admit("k", 0, 600, 400)


async def test_requests_per_minute_refill_continuously() -> None:
    clock = Clock()
    limiter = RateLimiter(InMemoryBuckets(clock))
    for _ in range(3):
        await limiter.admit("k", 3, 0, 10)
    with pytest.raises(RateLimited) as refused:
        await limiter.admit("k", 3, 0, 10)
    assert refused.value.retry_after_s == pytest.approx(20.0)
    clock.now += 20.0
    await limiter.admit("k", 3, 0, 10)
    await limiter.admit("other", 3, 0, 10)  # buckets are per key


async def test_a_request_larger_than_the_minute_allowance_is_invalid() -> None:
    with pytest.raises(InvalidInput):
        await RateLimiter(InMemoryBuckets(Clock())).admit("k", 0, 100, 101)


async def test_priority_gate_admits_core_before_interactive_before_batch() -> None:
    gate = PriorityGate(1)
    await gate.acquire(TrafficClass.INTERACTIVE)
    order: list[str] = []

    async def waiter(name: str, cls: TrafficClass) -> None:
        await gate.acquire(cls)
        order.append(name)
        gate.release()

    tasks = [asyncio.create_task(waiter(n, c)) for n, c in
             [("batch", TrafficClass.BATCH), ("interactive", TrafficClass.INTERACTIVE), ("core", TrafficClass.CORE)]]
    await asyncio.sleep(0)  # one loop turn: every waiter runs up to its queued future
    assert gate.waiting == 3
    gate.release()
    await asyncio.gather(*tasks)
    assert order == ["core", "interactive", "batch"]
    assert gate.in_use == 0


async def test_priority_gate_queue_is_bounded_and_refuses_with_a_retry_delay() -> None:
    gate = PriorityGate(1, max_waiting=2, retry_after_s=2.5)
    await gate.acquire(TrafficClass.INTERACTIVE)
    admitted: list[str] = []

    async def waiter(name: str, cls: TrafficClass) -> None:
        await gate.acquire(cls)
        admitted.append(name)
        gate.release()

    batch = [asyncio.create_task(waiter(f"batch{i}", TrafficClass.BATCH)) for i in range(2)]
    await asyncio.sleep(0)
    assert gate.waiting == 2
    # Full: a request of the same (lowest) class is refused at once, before it waits.
    with pytest.raises(QueueFull) as refused:
        gate.check_room(TrafficClass.BATCH)
    with pytest.raises(QueueFull) as refused:
        await gate.acquire(TrafficClass.BATCH)
    assert refused.value.retry_after_s == 2.5 and "queue is full" in refused.value.message
    assert gate.waiting == 2
    # A higher class takes the place of the newest lower-class waiter, which is refused.
    gate.check_room(TrafficClass.CORE)
    core = asyncio.create_task(waiter("core", TrafficClass.CORE))
    await asyncio.sleep(0)
    with pytest.raises(QueueFull, match="higher traffic class"):
        await batch[1]
    assert gate.waiting == 2
    gate.release()
    await asyncio.gather(core, batch[0])
    assert admitted == ["core", "batch0"] and gate.in_use == 0 and gate.waiting == 0


async def test_a_waiter_that_gives_up_leaves_the_queue() -> None:
    gate = PriorityGate(1, max_waiting=1)
    await gate.acquire(TrafficClass.CORE)
    for _ in range(100):  # waiters that time out never pile up behind a long-held slot
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(gate.acquire(TrafficClass.BATCH), 0.001)
        assert gate.waiting == 0
    gate.release()
    assert gate.try_acquire()
