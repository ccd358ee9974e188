"""Admit: what a planned request must be granted before its answer may reach the caller.

room in the wait queue (refused at once when full) → rate limit (prompt bound + max_tokens, up front) →
budget hold (none for a cache hit priced locally) → a slot of the priority gate. For a tenant billing last
placed below every alert threshold the generation may start while the hold is on the way (`EarlyStart`):
its call goes out, but not one reply is read before the hold is granted.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime

from services.common.generation import TrafficClass
from services.common.usage import Usage, UsageStatus
from services.router.admission import PriorityGate
from services.router.cache import CachedAnswer, ResponseCache
from services.router.gateway.plan import Plan, usage_record
from services.router.limits.token_bucket import Admission, RateLimiter
from services.router.metering import Meter
from services.router.ports import Hold, HoldRequest
from services.router.types import Chunk, Principal, RequestContext

NO_HOLD = Hold(hold_id="")


class Admitter:
    def __init__(self, meter: Meter, limiter: RateLimiter, cache: ResponseCache, gate: PriorityGate) -> None:
        self._meter = meter
        self._limiter = limiter
        self._cache = cache
        self._gate = gate

    async def admit(self, principal: Principal, plan: Plan) -> Admission:
        """Room in the wait queue, then the rate limit for the prompt bound + max_tokens."""
        self._gate.check_room(plan.traffic_class)  # a full wait queue refuses before limits and holds are spent
        return await self._limiter.admit(
            principal.key_id, principal.requests_per_minute, principal.tokens_per_minute,
            plan.prompt_bound + plan.max_tokens,
        )

    def cached(self, plan: Plan) -> CachedAnswer | None:
        return self._cache.get(plan.cache_key) if plan.cache_key is not None else None

    def may_start_early(self, principal: Principal, plan: Plan, hit: CachedAnswer | None) -> bool:
        """Whether the generation may start before its hold is granted (it then holds a gate slot already)."""
        return (hit is None and self._meter.may_start_before_hold(principal.tenant_id, plan.traffic_class)
                and self._gate.try_acquire())

    async def hold(self, ctx: RequestContext, plan: Plan, hit: CachedAnswer | None, start_wall: datetime,
                   early: bool, tighten: Callable[[Plan], Awaitable[int]] | None = None) -> Hold:
        """The budget hold of the request's maximum cost (none for a cache hit priced locally); `tighten`
        makes the plan's prompt bound exact where the leases cannot cover the loose one (then the edge of
        a budget is exact: a per-request Reserve, or the leases' last room, bounds only the completion)."""
        principal = ctx.principal
        if hit is not None and self._meter.may_skip_hold(principal.tenant_id) and self._meter.local_cost(
                usage_record(ctx, plan, hit.model, hit.model_version, Usage(hit.prompt_tokens,
                             hit.completion_tokens, cached=True), UsageStatus.COMPLETED, start_wall,
                             start_wall)) is not None:
            return NO_HOLD  # a cache hit priced locally: its usage is recorded without a hold
        reserve = self._meter.reserve_early if early else self._meter.reserve
        return await reserve(HoldRequest(
            request_id=ctx.request_id, tenant_id=principal.tenant_id, api_key_id=principal.key_id,
            model=plan.model.name, model_version=plan.version.version, traffic_class=plan.traffic_class,
            max_prompt_tokens=plan.prompt_bound, max_completion_tokens=plan.max_tokens, tags=plan.tags,
        ), deadline=ctx.deadline, exact=(lambda: tighten(plan)) if tighten is not None else None)

    async def withdraw(self, principal: Principal, admission: Admission, slot_held: bool) -> None:
        """A request refused before it ran: its gate slot and its rate-limit room go back."""
        if slot_held:
            self._gate.release()
        await self._limiter.settle(admission, principal.tokens_per_minute, 0)

    async def acquire(self, traffic_class: TrafficClass) -> None:
        await self._gate.acquire(traffic_class)

    def release(self) -> None:
        self._gate.release()


class EarlyStart:
    """A chunk stream pulled from at once, so its generation's call goes out now (its first reply is read
    only once the gateway's `go` event is set)."""

    def __init__(self, source: AsyncIterator[Chunk]) -> None:
        self._source = source
        self._first: asyncio.Task[Chunk] | None = asyncio.ensure_future(self._pull())
        self._closed = False
        self.finished = False  # the source ran to its end: nothing is left to close

    async def _pull(self) -> Chunk:
        return await anext(self._source)

    def __aiter__(self) -> EarlyStart:
        return self

    async def __anext__(self) -> Chunk:
        try:
            if self._first is not None:
                first, self._first = self._first, None
                return await first
            return await anext(self._source)
        except StopAsyncIteration:
            self.finished = True
            raise

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._first is not None:
            first, self._first = self._first, None
            first.cancel()
            await asyncio.wait([first])
            if not first.cancelled():
                first.exception()  # retrieved: a failure nobody will read is not an error to report
        aclose = getattr(self._source, "aclose", None)
        if aclose is not None:
            await aclose()
