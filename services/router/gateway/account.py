"""Account: what a request used, once it ended (completed, cancelled with the tokens delivered, or failed).

The rate limiter is settled with the tokens used; one usage event is settled with billing (answered at
once and settled right after, journaled first, when the router can price it locally; a batch item is
settled before it answers); the access-log line
and metrics are written; a completed turn of a stored conversation is appended to it. The observers
(`observers`: what a workflow keeps of each attempt) are told each event with its cost once it is known,
and again when billing's price for an event answered early differs from the router's.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Coroutine
from datetime import datetime
from typing import Any

import structlog

from services.common.errors import DomainError
from services.common.generation import FinishReason, TrafficClass
from services.common.usage import Usage, UsageStatus
from services.router import metrics
from services.router.contexts import ContextStore
from services.router.gateway.dispatch import Progress
from services.router.gateway.plan import Plan, usage_record
from services.router.limits.token_bucket import Admission, RateLimiter
from services.router.metering import Meter
from services.router.ports import Hold, UsageRecord
from services.router.types import (
    Message,
    Money,
    RequestContext,
    Role,
    Summary,
)

log = structlog.get_logger("router.access")


class Accountant:
    def __init__(self, meter: Meter, limiter: RateLimiter, contexts: ContextStore,
                 exact_prompt: Callable[[Plan], Awaitable[int]], clock: Callable[[], float],
                 wallclock: Callable[[], datetime]) -> None:
        self._meter = meter
        self._limiter = limiter
        self._contexts = contexts
        self._exact_prompt = exact_prompt
        self._clock = clock
        self._wallclock = wallclock
        self._background: set[asyncio.Task[object]] = set()
        self.observers: list[Callable[[UsageRecord, Money], Awaitable[None]]] = []

    async def finish(
        self, ctx: RequestContext, plan: Plan, hold: Hold, admission: Admission, progress: Progress,
        status: UsageStatus, started: float, start_wall: datetime, error: BaseException | None = None,
    ) -> Summary:
        final = progress.final
        if final is not None and final.usage is not None:
            usage = Usage(final.usage.prompt_tokens, final.usage.completion_tokens, cached=progress.cached)
            finish = final.finish_reason
            answered_model = final.model or plan.model.name
            answered_version = final.model_version or plan.version.version
        elif not progress.admitted:  # refused by the priority gate: nothing reached a model
            usage = Usage(0, 0, cached=False)
            finish = FinishReason.CANCELLED if status == UsageStatus.CANCELLED else FinishReason.ERROR
            answered_model, answered_version = plan.model.name, plan.version.version
        else:
            prompt_tokens = plan.prompt_exact if plan.prompt_exact is not None else await self._exact_prompt(plan)
            usage = Usage(prompt_tokens, progress.tokens, cached=progress.cached)
            finish = FinishReason.CANCELLED if status == UsageStatus.CANCELLED else FinishReason.ERROR
            answered_model, answered_version = plan.model.name, plan.version.version
        if status == UsageStatus.COMPLETED and finish == FinishReason.ERROR:
            status = UsageStatus.FAILED
        principal = ctx.principal
        # The event names the leases its request was admitted against, in the journal as on the wire.
        record = self._meter.with_leases(hold, usage_record(ctx, plan, answered_model, answered_version, usage,
                                                            status, start_wall, self._wallclock()))
        await self._limiter.settle(admission, principal.tokens_per_minute, usage.total_tokens)
        ttft = int(((progress.first_token_at or self._clock()) - started) * 1000)
        latency_ms = int((self._clock() - started) * 1000)
        local = None if hold.offline else self._meter.local_cost(record)
        if local is not None and plan.traffic_class == TrafficClass.BATCH:
            # A batch item's result is committed after this returns: settle first, so a router that dies
            # in between leaves an item that another router re-runs under the same event id, never one
            # whose usage waits in this router's journal.
            local = await self._settle(hold, record, local, ttft, latency_ms, error)
        elif local is not None:
            # The cost is known now: answer at once, settle (and log) right after the last message. The
            # event is journaled first, so a router that dies before settling replays it at its next start.
            self._meter.note_answered(record)
            self.spawn(self._settle(hold, record, local, ttft, latency_ms, error, journaled=True))
        else:
            local = await self._settle(hold, record, None, ttft, latency_ms, error)
        await self._observe(record, local)
        if status == UsageStatus.COMPLETED:
            if plan.context_id:
                await self._contexts.aappend(principal.tenant_id, plan.context_id,
                                             (*plan.new_turn, Message(Role.ASSISTANT, progress.text)))
        return Summary(finish, Usage(usage.prompt_tokens, usage.completion_tokens, usage.cached), local,
                       answered_model, answered_version, ctx.trace_id, ttft)

    async def _settle(
        self, hold: Hold, record: UsageRecord, expected: Money | None, ttft_ms: int, latency_ms: int,
        error: BaseException | None, journaled: bool = False,
    ) -> Money:
        """Send the one usage event and write the access-log line; returns the cost billing computed (or
        the expected one when billing could not say)."""
        cost: Money | None = None
        try:
            cost = await self._meter.settle(hold, record)
        except DomainError as exc:
            log.error("usage_settle_failed", reason=exc.reason, message=exc.message, event_id=record.event_id)
        if journaled:  # billing or the spool has it now (or billing refused it for good: logged above)
            self._meter.note_settled(record)
        if cost is None:
            cost = expected
        elif expected is not None and cost != expected:
            log.warning("price_book_stale", event_id=record.event_id, expected_micros=expected.micros,
                        billed_micros=cost.micros)
            self.spawn(self._meter.refresh_prices())
        elif expected is None:
            self.spawn(self._meter.refresh_prices(min_interval_s=1.0))  # priced in billing, unknown here
        cost = cost or Money()
        if journaled and cost != expected:
            await self._observe(record, cost)  # observers were told the router's price; billing's differs
        metrics.observe(record, cost, ttft_ms, latency_ms)
        log.info(
            "access", tenant=record.tenant_id, api_key=record.api_key_id, model=record.model,
            version=record.model_version, traffic_class=record.traffic_class.name, prompt_tokens=record.prompt_tokens,
            completion_tokens=record.completion_tokens, cached=record.cached, cost_micros=cost.micros,
            currency=cost.currency_code, ttft_ms=ttft_ms, latency_ms=latency_ms, status=record.status.name,
            error=getattr(error, "reason", type(error).__name__ if error else None),
            trace_id=record.trace_id, request_id=record.request_id, tags=record.tags,
        )
        return cost

    async def _observe(self, record: UsageRecord, cost: Money) -> None:
        for observer in self.observers:
            try:
                await observer(record, cost)
            except Exception:
                log.exception("usage_observer_failed", event_id=record.event_id)

    def spawn(self, coro: Coroutine[Any, Any, object]) -> asyncio.Task[object]:
        """Run `coro` in the background; `drain()` waits for it."""
        task: asyncio.Task[object] = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    async def drain(self) -> None:
        """Wait for background settlements (at shutdown, before the billing channel closes)."""
        while self._background:
            await asyncio.gather(*list(self._background), return_exceptions=True)
