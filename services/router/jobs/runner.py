"""The background worker that runs batch jobs.

Each tick looks at the unfinished jobs earliest deadline first (then oldest first) and
  - fails the pending and running items of a job whose deadline has passed (DEADLINE_EXCEEDED);
  - pauses a job while billing says its tenant's budget is CRITICAL or worse, and resumes it afterwards;
  - waits (dispatches nothing) while billing cannot be asked at all;
  - otherwise hands pending items to free slots: at most `concurrency` items run at once, router-wide.
An item runs through `execute` — the same gateway path as a normal request, at BATCH class, with the
submitting key's identity — under the request id `<job_id>-<index>`, so a re-run after a crash is still
one usage event. Transient refusals (budget, billing unreachable, rate limit, full queue) put the item
back to PENDING; other errors fail the item with the status code name.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime

import structlog

from services.common.errors import BudgetExceeded, DomainError, QueueFull, RateLimited
from services.router.jobs.model import ClaimedItem, ItemResult, ItemState, Job, JobState
from services.router.jobs.store import JobStore
from services.router.metering import BillingUnavailable
from services.router.ports import AlertLevel
from services.router.types import (
    CachePolicy,
    GenerationRequest,
    Principal,
    RequestContext,
    Summary,
    TrafficClass,
)

log = structlog.get_logger(__name__)

Execute = Callable[[RequestContext, GenerationRequest], Awaitable[tuple[str, Summary]]]
LevelOf = Callable[[Principal, dict[str, str]], Awaitable[AlertLevel]]
TRANSIENT = (BudgetExceeded, BillingUnavailable, RateLimited, QueueFull)


@dataclass(frozen=True)
class RunnerSettings:
    concurrency: int = 4
    poll_s: float = 0.5
    # How long shutdown waits for running items before putting them back to PENDING.
    shutdown_grace_s: float = 10.0


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
        self._stop_reason: dict[tuple[str, int], str] = {}
        self._wake = asyncio.Event()
        self._closing = False

    def wake(self) -> None:
        self._wake.set()

    def running_items(self, job_id: str) -> int:
        return sum(1 for job, _ in self._running if job == job_id)

    async def run_forever(self) -> None:
        recovered = self._store.recover()
        if recovered:
            log.info("batch_items_recovered", items=recovered)
        while not self._closing:
            self._wake.clear()
            try:
                await self.tick()
            except Exception:  # the worker must outlive one bad tick; the next one retries
                log.exception("batch_tick_failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.settings.poll_s)

    async def tick(self) -> None:
        now = self._wallclock()
        levels: dict[str, AlertLevel | None] = {}
        for job in self._store.active():
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
                    self._store.set_state(job.job_id, JobState.PAUSED)
                    log.info("batch_job_paused", job_id=job.job_id, tenant=job.principal.tenant_id, level=level.name)
                continue
            counts = self._store.counts(job.job_id)
            if not counts.get(ItemState.PENDING) and not counts.get(ItemState.RUNNING):
                self._finalize(job, counts, now)
                continue
            free = self.settings.concurrency - len(self._running)
            if free <= 0 or not counts.get(ItemState.PENDING):
                continue
            if job.state != JobState.RUNNING:
                if job.state == JobState.PAUSED:
                    log.info("batch_job_resumed", job_id=job.job_id, tenant=job.principal.tenant_id)
                self._store.set_state(job.job_id, JobState.RUNNING)
            for item in self._store.claim(job.job_id, free):
                key = (item.job_id, item.index)
                self._running[key] = asyncio.create_task(self._run(job, item))

    async def _level(self, job: Job) -> AlertLevel | None:
        try:
            return await self._level_of(job.principal, job.tags)
        except DomainError as exc:
            log.warning("batch_budget_check_failed", job_id=job.job_id, reason=exc.reason)
            return None

    def _finalize(self, job: Job, counts: dict[ItemState, int], now: datetime) -> None:
        state = JobState.FAILED if counts.get(ItemState.FAILED) else JobState.SUCCEEDED
        self._store.set_state(job.job_id, state, end_time=now)
        log.info("batch_job_finished", job_id=job.job_id, state=state.name, items=job.total_items)

    async def _expire(self, job: Job, now: datetime) -> None:
        message = "the job's deadline passed before this item ran"
        await self._stop_items(job.job_id, "deadline")
        self._store.close_pending(job.job_id, ItemState.FAILED, "DEADLINE_EXCEEDED", message)
        self._store.set_state(job.job_id, JobState.FAILED, end_time=now)
        log.info("batch_job_deadline_passed", job_id=job.job_id)

    async def cancel(self, job_id: str) -> None:
        """Stop the job's running items (billed for what they generated) and cancel its pending ones."""
        self._store.close_pending(job_id, ItemState.CANCELLED, "CANCELLED", "the job was cancelled")
        await self._stop_items(job_id, "cancel")
        self._store.close_pending(job_id, ItemState.CANCELLED, "CANCELLED", "the job was cancelled")
        self._store.set_state(job_id, JobState.CANCELLED, end_time=self._wallclock())

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
            text, summary = await self._execute(ctx, request)
        except asyncio.CancelledError:
            reason = self._stop_reason.pop(key, "shutdown")
            if reason == "cancel":
                self._finish(item, ItemState.CANCELLED, "CANCELLED", "the job was cancelled")
            elif reason == "deadline":
                self._finish(item, ItemState.FAILED, "DEADLINE_EXCEEDED", "the job's deadline passed")
            else:
                self._store.requeue_item(item.job_id, item.index)
        except TRANSIENT as exc:
            self._store.requeue_item(item.job_id, item.index)
            if isinstance(exc, BudgetExceeded):
                self._store.set_state(item.job_id, JobState.PAUSED)
                log.info("batch_job_paused", job_id=item.job_id, reason=exc.reason)
        except DomainError as exc:
            self._finish(item, ItemState.FAILED, self._status_name(exc), exc.message)
        except Exception:
            log.exception("batch_item_crashed", job_id=item.job_id, index=item.index)
            self._finish(item, ItemState.FAILED, "INTERNAL", "internal error; the router logged the details")
        else:
            self._store.finish_item(item.job_id, item.index, ItemResult(
                custom_id=spec.custom_id, state=ItemState.SUCCEEDED, text=text, finish_reason=summary.finish_reason,
                usage=summary.usage, cost_micros=summary.cost.micros,
            ), currency=summary.cost.currency_code)
        finally:
            self._running.pop(key, None)
            self._wake.set()

    def _finish(self, item: ClaimedItem, state: ItemState, code: str, message: str) -> None:
        self._store.finish_item(item.job_id, item.index, ItemResult(item.spec.custom_id, state, error_code=code,
                                                                    error_message=message))

    async def close(self) -> None:
        """Stop dispatching; give running items a grace period, then put the rest back to PENDING."""
        self._closing = True
        self._wake.set()
        tasks = list(self._running.values())
        if tasks:
            _, late = await asyncio.wait(tasks, timeout=self.settings.shutdown_grace_s)
            for task in late:
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)
