"""A batch item's usage event is settled before its request returns (the runner commits the item's result
only then, so a router that dies in between leaves an item another router re-runs under the same event
id, never usage stranded in this router's journal); an interactive request is answered first and settled
right after, as before."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from types import SimpleNamespace
from typing import Any, cast

from services.common.generation import TrafficClass
from services.common.usage import UsageStatus
from services.router.gateway.account import Accountant
from services.router.gateway.dispatch import Progress
from services.router.gateway.plan import Plan
from services.router.limits.token_bucket import Admission, InMemoryBuckets, RateLimiter
from services.router.ports import Hold, UsageRecord
from services.router.types import (
    GenerationRequest,
    Money,
    Principal,
    RequestContext,
)
from tests.waiting import wait_until


class BlockingMeter:
    """The part of `Meter` the accountant uses; `settle` waits until the test releases it."""

    def __init__(self) -> None:
        self.settling: list[str] = []
        self.release = asyncio.Event()

    def local_cost(self, usage: UsageRecord) -> Money:
        return Money("USD", 5)

    @staticmethod
    def with_leases(hold: Hold, usage: UsageRecord) -> UsageRecord:
        return usage

    def note_answered(self, usage: UsageRecord) -> None:
        pass

    def note_settled(self, usage: UsageRecord) -> None:
        pass

    async def settle(self, hold: Hold, usage: UsageRecord) -> Money:
        self.settling.append(usage.event_id)
        await self.release.wait()
        return Money("USD", 5)

    async def refresh_prices(self, min_interval_s: float = 0.0) -> None:
        pass


def plan(traffic_class: TrafficClass) -> Plan:
    return Plan(
        model=cast("Any", SimpleNamespace(name="m")), version=cast("Any", SimpleNamespace(version="v1")),
        policy=cast("Any", None), traffic_class=traffic_class, prompt="hi", messages=(), raw_prompt=True,
        max_tokens=4, sampling_max=None, prompt_bound=4, prompt_exact=2, cache_key=None, context_id="",
        new_turn=(), tags={}, request=GenerationRequest(model="m", prompt="hi"),
    )


async def finish(accountant: Accountant, traffic_class: TrafficClass, request_id: str) -> Money:
    ctx = RequestContext(request_id, "trace", Principal("acme", "key"), {})
    summary = await accountant.finish(ctx, plan(traffic_class), Hold("hold-1"), Admission("key", 0), Progress(),
                                      UsageStatus.COMPLETED, 0.0, datetime.now(UTC))
    return summary.cost


def accountant(meter: BlockingMeter) -> Accountant:
    return Accountant(cast("Any", meter), RateLimiter(InMemoryBuckets()), cast("Any", None),
                      exact_prompt=lambda p: asyncio.sleep(0, 2), clock=lambda: 0.0,
                      wallclock=lambda: datetime.now(UTC))


async def test_a_batch_item_returns_only_once_its_usage_event_is_settled() -> None:
    meter = BlockingMeter()
    running = asyncio.create_task(finish(accountant(meter), TrafficClass.BATCH, "job_1-0"))
    await wait_until(lambda: meter.settling == ["job_1-0"], 5, "the settle to start")
    assert not running.done()  # still settling: the runner cannot commit the result yet
    meter.release.set()
    assert await asyncio.wait_for(running, 5) == Money("USD", 5)


async def test_an_interactive_request_is_answered_before_its_settle() -> None:
    meter = BlockingMeter()
    accounts = accountant(meter)
    assert await asyncio.wait_for(finish(accounts, TrafficClass.INTERACTIVE, "req-1"), 5) == Money("USD", 5)
    await wait_until(lambda: meter.settling == ["req-1"], 5, "the settle to start after the answer")
    meter.release.set()
    await asyncio.wait_for(accounts.drain(), 5)
