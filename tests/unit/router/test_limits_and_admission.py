"""Token buckets admit prompt + max_tokens up front, correct at the end, and tell how long to wait."""

from __future__ import annotations

import asyncio

import pytest

from services.common.errors import InvalidInput, RateLimited
from services.router.admission import PriorityGate
from services.router.limits.token_bucket import InMemoryBuckets, RateLimiter
from services.router.types import TrafficClass


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
