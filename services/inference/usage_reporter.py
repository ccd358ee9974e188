"""Engine-side metering: every finished sequence is reported to billing, in batches, off the decode path.

The engine hands each sequence that leaves it to `UsageReporter.add` — an append to a bounded in-memory
buffer, nothing more, so decoding never waits for billing. A background task sends the buffer in batches
(`batch` records, or what `flush_s` gathered) through an `EngineUsagePort` and drops a batch only once
billing answered it (after its commit). While billing is unreachable the records stay buffered and the
send is retried with backoff; when the buffer is full the oldest record is dropped. Everything is counted:

- `autoglm_inference_usage_records_total{replica,outcome}`: reported, rejected (billing refused the record:
  logged and not retried), dropped (the buffer was full), unreported (skipped: a request without a tenant);
- `autoglm_inference_usage_records_buffered{replica}`: records waiting to be sent;
- `autoglm_inference_usage_report_failures_total{replica}`: sends that failed (the batch is kept).

Billing reconciles the records with the routers' usage events (services/billing/engine_usage.py).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Sequence
from typing import Protocol

import structlog
from prometheus_client import Counter, Gauge

from services.common.errors import DomainError
from services.inference.engine.types import FinishedSequence

log = structlog.get_logger(__name__)

RECORDS = Counter("autoglm_inference_usage_records", "Finished sequences for billing, by outcome: reported, "
                  "rejected, dropped (buffer full), unreported (no tenant)", ["replica", "outcome"])
BUFFERED = Gauge("autoglm_inference_usage_records_buffered", "Finished sequences waiting to be reported to billing",
                 ["replica"])
FAILURES = Counter("autoglm_inference_usage_report_failures", "Reports to billing that failed (the batch is kept "
                   "and sent again)", ["replica"])


class EngineUsagePort(Protocol):
    async def report(self, records: Sequence[FinishedSequence]) -> list[tuple[int, str]]:
        """Send a batch; returns the (index, reason) of each record billing refused. Raises a DomainError
        when billing did not take the batch (nothing of it counts as reported)."""
        ...

    async def close(self) -> None: ...


class UsageReporter:
    def __init__(self, port: EngineUsagePort, replica_id: str, capacity: int = 100_000, batch: int = 500,
                 flush_s: float = 0.5, retry_base_s: float = 0.2, retry_max_s: float = 5.0) -> None:
        if capacity < 1 or not 1 <= batch <= 1000 or flush_s < 0:
            raise ValueError("the usage buffer needs capacity >= 1, 1 <= batch <= 1000 and flush_s >= 0")
        self.port = port
        self.replica_id = replica_id
        self.capacity = capacity
        self.batch = batch
        self.flush_s = flush_s
        self.retry_base_s = retry_base_s
        self.retry_max_s = retry_max_s
        self._buffer: deque[FinishedSequence] = deque()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._buffered = BUFFERED.labels(replica_id)
        self._counts = {outcome: RECORDS.labels(replica_id, outcome)
                        for outcome in ("reported", "rejected", "dropped", "unreported")}
        self._failures = FAILURES.labels(replica_id)

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    def add(self, finished: FinishedSequence) -> None:
        """Buffer one finished sequence (never blocks; the oldest is dropped when the buffer is full)."""
        if not finished.request.tenant_id:
            self._counts["unreported"].inc()
            return
        self._buffer.append(finished)
        self._trim()
        self._buffered.set(len(self._buffer))
        if len(self._buffer) == 1 or len(self._buffer) >= self.batch:
            self._wake.set()

    def _trim(self) -> None:
        while len(self._buffer) > self.capacity:
            self._buffer.popleft()
            self._counts["dropped"].inc()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="usage-reporter")

    async def stop(self, flush_timeout_s: float = 2.0) -> None:
        """Stop sending; one last attempt (within the timeout) sends what is buffered."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._drain_once(), flush_timeout_s)
        await self.port.close()

    async def _drain_once(self) -> None:
        while self._buffer and await self.send_batch():
            pass

    async def _run(self) -> None:
        delay = self.retry_base_s
        while True:
            await self._gather()
            if await self.send_batch():
                delay = self.retry_base_s
            else:
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.retry_max_s)

    async def _gather(self) -> None:
        """Wait for a record, then up to `flush_s` for a full batch."""
        while not self._buffer:
            self._wake.clear()
            await self._wake.wait()
        if len(self._buffer) < self.batch and self.flush_s > 0:
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.flush_s)

    async def send_batch(self) -> bool:
        """Send the oldest records (one batch); False when billing did not take it (the records are kept)."""
        batch = [self._buffer.popleft() for _ in range(min(self.batch, len(self._buffer)))]
        if not batch:
            return True
        try:
            rejected = await self.port.report(batch)
        except (DomainError, asyncio.CancelledError) as exc:
            self._buffer.extendleft(reversed(batch))  # back in front, oldest first; new ones may push them out
            self._trim()
            self._buffered.set(len(self._buffer))
            if isinstance(exc, asyncio.CancelledError):
                raise
            self._failures.inc()
            log.warning("usage_report_failed", reason=exc.reason, message=exc.message, buffered=len(self._buffer))
            return False
        self._buffered.set(len(self._buffer))
        for index, reason in rejected:
            log.error("usage_record_refused", request_id=batch[index].request.request_id, reason=reason)
        self._counts["rejected"].inc(len(rejected))
        self._counts["reported"].inc(len(batch) - len(rejected))
        return True
