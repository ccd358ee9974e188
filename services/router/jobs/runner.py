"""The background worker that runs batch jobs.

Each tick looks at the unfinished jobs earliest deadline first (then oldest first) and
  - fails the pending and running items of a job whose deadline has passed (DEADLINE_EXCEEDED);
  - pauses a job while billing says its tenant's budget is CRITICAL or worse, and resumes it afterwards;
  - waits (dispatches nothing) while billing cannot be asked at all;
  - otherwise claims items for free slots: at most `concurrency` items run at once, router-wide.
Routers sharing the store share the work: a claim is a lease on the item (services/router/jobs/store.py),
renewed every `lease_s / 3` while the item runs. An item whose router died is claimed again by any router
once its lease (`lease_s`) expired; a router that learns at a renewal that an item is no longer its own
(taken over, or its job cancelled or past its deadline through another router) stops it, and a router
that cannot renew for a whole lease stops all of its items, so two routers never run one item at once.
An item runs through `execute` — the same gateway path as a normal request, at BATCH class, with the
submitting key's identity — under the request id `<job_id>-<index>` (the usage event id), so a re-run
after a router died is still one usage event; only the claim's holder commits the item's result, once.
Transient refusals (budget, billing unreachable, rate limit or its store unreachable, full queue) put
the item back to PENDING; other errors fail the item with the status code name.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import structlog

from services.common.errors import BudgetExceeded, DomainError, QueueFull, RateLimited
from services.common.generation import TrafficClass
from services.common.usage import AlertLevel
from services.router.jobs.model import ClaimedItem, ItemResult, ItemState, Job, JobState
from services.router.jobs.store import JobStore
from services.router.limits.token_bucket import RateLimitUnavailable
from services.router.metering import BillingUnavailable
from services.router.types import (
    CachePolicy,
    GenerationRequest,
    Principal,
    RequestContext,
    Summary,
)

log = structlog.get_logger(__name__)

Execute = Callable[[RequestContext, GenerationRequest], Awaitable[tuple[str, Summary]]]
LevelOf = Callable[[Principal, dict[str, str]], Awaitable[AlertLevel]]
TRANSIENT = (BudgetExceeded, BillingUnavailable, RateLimited, RateLimitUnavailable, QueueFull)
T = TypeVar("T")


@dataclass(frozen=True)
class RunnerSettings:
    concurrency: int = 4
    poll_s: float = 0.5
    # How long shutdown waits for running items before putting them back to PENDING.
    shutdown_grace_s: float = 10.0
    # How long a claim holds without renewal: a dead router's items are taken over after this.
    lease_s: float = 15.0


class BatchRunner:
    def __init__(
        self,
        store: JobStore,
        execute: Execute,
        level_of: LevelOf,
        status_name: Callable[[DomainError], str],
        settings: RunnerSettings | None = None,
        wallclock: Callable[[], datetime] = lambda: datetime.now(UTC),
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._store = store
        self._execute = execute
        self._level_of = level_of
        self._status_name = status_name
        self.settings = settings or RunnerSettings()
        self._wallclock = wallclock
        self._clock = clock
        self._running: dict[tuple[str, int], asyncio.Task[None]] = {}
        self._generating: set[tuple[str, int]] = set()  # running items not yet committing their result
        self._stop_reason: dict[tuple[str, int], str] = {}
        self._wake = asyncio.Event()
        self._closing = False
        self._heartbeat: asyncio.Task[None] | None = None

    def wake(self) -> None:
        self._wake.set()

    def running_items(self, job_id: str) -> int:
        return sum(1 for job, _ in self._running if job == job_id)

    async def _db(self, fn: Callable[..., T], *args: Any) -> T:
        """A store call, off the event loop."""
        return await asyncio.to_thread(fn, *args)

    def _until(self, now: datetime) -> datetime:
        return now + timedelta(seconds=self.settings.lease_s)

    async def run_forever(self) -> None:
        self._heartbeat = asyncio.create_task(self._renew_forever())
        try:
            while not self._closing:
                self._wake.clear()
                try:
                    await self.tick()
                except Exception:  # the worker must outlive one bad tick; the next one retries
                    log.exception("batch_tick_failed")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self.settings.poll_s)
        finally:
            if not self._closing:  # cancelled from outside; otherwise `close` stops renewing once items ended
                await self._stop_heartbeat()

    async def _stop_heartbeat(self) -> None:
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            await asyncio.gather(self._heartbeat, return_exceptions=True)
            self._heartbeat = None

    async def _renew_forever(self) -> None:
        held_until = self._clock() + self.settings.lease_s
        failing = False
        while True:
            await asyncio.sleep(self.settings.lease_s / 3)
            if not self._running:
                held_until = self._clock() + self.settings.lease_s
                continue
            try:
                held_until = await self.renew()
            except Exception as exc:  # the database is away: the leases run out unless a renewal succeeds
                if not failing:
                    log.warning("batch_lease_renewal_failed", error=f"{type(exc).__name__}: {exc}")
                failing = True
                if self._clock() >= held_until and self._generating:
                    log.warning("batch_items_stopped_unrenewed", items=len(self._generating))
                    self._stop(list(self._generating), "lost")
                continue
            if failing:
                log.info("batch_lease_renewal_recovered")
            failing = False

    async def renew(self) -> float:
        """Renew this router's leases and stop the items it no longer holds; returns (monotonic) until
        when the leases hold."""
        started = self._clock()
        mine = set(self._generating)  # claims made while renewing are checked at the next renewal
        held = await self._db(self._store.renew, self._until(self._wallclock()))
        for key in mine:
            state = held.get(key)
            if state is None:
                log.warning("batch_item_lease_lost", job_id=key[0], index=key[1])
                self._stop([key], "lost")
            elif state == JobState.CANCELLED:
                self._stop([key], "cancel")
            elif state.finished:
                self._stop([key], "deadline")
        return started + self.settings.lease_s

    def _stop(self, keys: list[tuple[str, int]], reason: str) -> None:
        for key in keys:
            task = self._running.get(key)
            if task is not None and key in self._generating:
                self._stop_reason[key] = reason
                task.cancel()

    async def tick(self) -> None:
        now = self._wallclock()
        levels: dict[str, AlertLevel | None] = {}
        for job in await self._db(self._store.active):
            if job.deadline is not None and job.deadline <= now:
                await self._expire(job, now)
                continue
            if job.principal.tenant_id not in levels:
                levels[job.principal.tenant_id] = await self._level(job)
            level = levels[job.principal.tenant_id]
            if level is None:
                continue  # billing cannot say: batch work waits for it
            if level >= AlertLevel.CRITICAL:
                if job.state != JobState.PAUSED:
                    await self._db(self._store.set_state, job.job_id, JobState.PAUSED)
                    log.info("batch_job_paused", job_id=job.job_id, tenant=job.principal.tenant_id, level=level.name)
                continue
            counts = await self._db(self._store.counts, job.job_id)
            if not counts.get(ItemState.PENDING) and not counts.get(ItemState.RUNNING):
                await self._finalize(job, counts, now)
                continue
            free = self.settings.concurrency - len(self._running)
            if free <= 0:
                continue
            if not counts.get(ItemState.PENDING) and not await self._db(self._store.claimable, job.job_id, now):
                continue  # every item left runs on a live claim (this router's or another's)
            if job.state != JobState.RUNNING:
                if job.state == JobState.PAUSED:
                    log.info("batch_job_resumed", job_id=job.job_id, tenant=job.principal.tenant_id)
                await self._db(self._store.set_state, job.job_id, JobState.RUNNING)
            for item in await self._db(self._store.claim, job.job_id, free, now, self._until(now)):
                if item.taken_over:
                    log.info("batch_item_taken_over", job_id=item.job_id, index=item.index)
                key = (item.job_id, item.index)
                self._generating.add(key)
                self._running[key] = asyncio.create_task(self._run(job, item))

    async def _level(self, job: Job) -> AlertLevel | None:
        try:
            return await self._level_of(job.principal, job.tags)
        except DomainError as exc:
            log.warning("batch_budget_check_failed", job_id=job.job_id, reason=exc.reason)
            return None

    async def _finalize(self, job: Job, counts: dict[ItemState, int], now: datetime) -> None:
        state = JobState.FAILED if counts.get(ItemState.FAILED) else JobState.SUCCEEDED
        if await self._db(self._store.set_state, job.job_id, state, now):
            log.info("batch_job_finished", job_id=job.job_id, state=state.name, items=job.total_items)

    async def _expire(self, job: Job, now: datetime) -> None:
        """Fail what is left of a job past its deadline; items running on other live routers stop at their
        next renewal (or at the deadline their request carries)."""
        message = "the job's deadline passed before this item ran"
        await self._stop_items(job.job_id, "deadline")
        await self._db(self._store.close_pending, job.job_id, ItemState.FAILED, "DEADLINE_EXCEEDED", message)
        await self._db(self._store.close_running, job.job_id, ItemState.FAILED, "DEADLINE_EXCEEDED",
                       "the job's deadline passed", now)
        if await self._db(self._store.set_state, job.job_id, JobState.FAILED, now):
            log.info("batch_job_deadline_passed", job_id=job.job_id)

    async def cancel(self, job_id: str) -> None:
        """Stop the job's running items (billed for what they generated) and cancel its pending ones; items
        running on another router stop at its next lease renewal."""
        message = "the job was cancelled"
        await self._db(self._store.close_pending, job_id, ItemState.CANCELLED, "CANCELLED", message)
        await self._stop_items(job_id, "cancel")
        await self._db(self._store.close_pending, job_id, ItemState.CANCELLED, "CANCELLED", message)
        now = self._wallclock()
        await self._db(self._store.close_running, job_id, ItemState.CANCELLED, "CANCELLED", message, now)
        await self._db(self._store.set_state, job_id, JobState.CANCELLED, now)

    async def _stop_items(self, job_id: str, reason: str) -> None:
        tasks = []
        for key, task in list(self._running.items()):
            if key[0] == job_id:
                self._stop_reason[key] = reason
                task.cancel()
                tasks.append(task)
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _run(self, job: Job, item: ClaimedItem) -> None:
        key = (item.job_id, item.index)
        spec = item.spec
        request = GenerationRequest(
            model=job.model, prompt=spec.prompt, messages=spec.messages, sampling=spec.sampling, tags=job.tags,
            traffic_class=TrafficClass.BATCH, cache_policy=CachePolicy.DEFAULT,
        )
        deadline = None
        if job.deadline is not None:
            deadline = self._clock() + max(0.0, (job.deadline - self._wallclock()).total_seconds())
        ctx = RequestContext(f"{item.job_id}-{item.index}", uuid.uuid4().hex, job.principal, dict(job.tags),
                             deadline=deadline)
        try:
            try:
                text, summary = await self._execute(ctx, request)
            finally:
                self._generating.discard(key)
        except asyncio.CancelledError:
            reason = self._stop_reason.pop(key, "shutdown")
            if reason == "cancel":
                await self._finish(item, ItemState.CANCELLED, "CANCELLED", "the job was cancelled")
            elif reason == "deadline":
                await self._finish(item, ItemState.FAILED, "DEADLINE_EXCEEDED", "the job's deadline passed")
            elif reason == "shutdown":
                await self._db(self._store.requeue_item, item.job_id, item.index)
            # "lost": the item is another router's now; nothing of this run is written
        except TRANSIENT as exc:
            await self._db(self._store.requeue_item, item.job_id, item.index)
            if isinstance(exc, BudgetExceeded):
                await self._db(self._store.set_state, item.job_id, JobState.PAUSED)
                log.info("batch_job_paused", job_id=item.job_id, reason=exc.reason)
        except DomainError as exc:
            await self._finish(item, ItemState.FAILED, self._status_name(exc), exc.message)
        except Exception:
            log.exception("batch_item_crashed", job_id=item.job_id, index=item.index)
            await self._finish(item, ItemState.FAILED, "INTERNAL", "internal error; the router logged the details")
        else:
            await self._commit(item, ItemResult(
                custom_id=spec.custom_id, state=ItemState.SUCCEEDED, text=text, finish_reason=summary.finish_reason,
                usage=summary.usage, cost_micros=summary.cost.micros,
            ), summary.cost.currency_code)
        finally:
            self._running.pop(key, None)
            self._wake.set()

    async def _finish(self, item: ClaimedItem, state: ItemState, code: str, message: str) -> None:
        await self._commit(item, ItemResult(item.spec.custom_id, state, error_code=code, error_message=message))

    async def _commit(self, item: ClaimedItem, result: ItemResult, currency: str = "") -> None:
        if not await self._db(self._store.finish_item, item.job_id, item.index, result, currency):
            log.warning("batch_item_result_dropped", job_id=item.job_id, index=item.index, state=result.state.name,
                        why="this router no longer holds the item's claim")

    async def close(self) -> None:
        """Stop dispatching; give running items a grace period, then put the rest back to PENDING."""
        self._closing = True
        self._wake.set()
        tasks = list(self._running.values())
        if tasks:  # their leases are still renewed meanwhile
            _, late = await asyncio.wait(tasks, timeout=self.settings.shutdown_grace_s)
            for task in late:
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)
        await self._stop_heartbeat()
