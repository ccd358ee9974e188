"""Continuous batching.

One asyncio task drives the loop; every model step runs on a single worker thread so the event loop
stays free. Before each step the loop drops cancelled sequences, admits waiting ones by priority
(core > interactive > batch) up to `max_batch_size`, and plans the step: one decode row per running
sequence plus prompt chunks (fixed `prefill_chunk` boundaries, each prefilled on its own so the
cache never depends on the batch) while `max_batched_tokens` allows, at least one chunk per step.
A sequence whose prompt is done joins the decode batch at the next step; a finished one leaves
within the step that finished it.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import structlog

from services.common.errors import NotReady, QueueFull
from services.inference.engine.kv_cache import DecodeBatch, KvSpec
from services.inference.engine.sequence import Phase, Sequence
from services.inference.engine.session import ModelRunner
from services.inference.engine.types import Delta

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class SchedulerSettings:
    max_batch_size: int = 16
    max_batched_tokens: int = 256
    prefill_chunk: int = 128
    queue_capacity: int = 128
    decode_rows: int = 16  # rows per model call; larger batches run as several calls

    def __post_init__(self) -> None:
        for name in ("max_batch_size", "max_batched_tokens", "prefill_chunk", "queue_capacity", "decode_rows"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


@dataclass
class StepPlan:
    leaving: list[Sequence] = field(default_factory=list)
    decode: list[Sequence] = field(default_factory=list)
    prefill: list[tuple[Sequence, int]] = field(default_factory=list)


@dataclass
class Counters:
    cancelled_total: int = 0
    generated_total: int = 0
    kv_tokens: int = 0
    steps: int = 0
    recent: deque[tuple[float, int]] = field(default_factory=lambda: deque(maxlen=256))

    def tokens_per_second(self, window_s: float = 2.0) -> float:
        now = time.monotonic()
        points = [(t, n) for t, n in self.recent if now - t <= window_s]
        if len(points) < 2:
            return 0.0
        (t0, n0), (_, n1) = points[0], points[-1]
        return (n1 - n0) / (now - t0) if now > t0 else 0.0


class Scheduler:
    def __init__(self, runner: ModelRunner, spec: KvSpec, settings: SchedulerSettings) -> None:
        self.runner = runner
        self.spec = spec
        self.settings = settings
        self.counters = Counters()
        self._waiting: list[tuple[int, int, Sequence]] = []
        self._order = itertools.count()
        self._running: list[Sequence] = []
        self._groups: list[DecodeBatch] = []
        self._where: dict[int, DecodeBatch] = {}
        self._wake = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="inference-step")
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    # ---- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._loop(), name="inference-scheduler")

    async def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        if self._task is not None:
            await self._task
            self._task = None
        for seq in [*self._running, *(s for _, _, s in self._waiting)]:
            seq.events.put_nowait(seq.fail())
        self._executor.shutdown(wait=True)

    # ---- what the engine calls --------------------------------------------------------------
    @property
    def running(self) -> bool:
        return self._task is not None and not self._stopping

    @property
    def queue_depth(self) -> int:
        return len(self._waiting)

    @property
    def active(self) -> int:
        return len(self._running)

    def submit(self, seq: Sequence) -> None:
        if self._stopping or self._task is None:
            raise NotReady("the inference engine is not running; retry on another replica")
        if len(self._waiting) >= self.settings.queue_capacity:
            raise QueueFull(
                f"the admission queue is full ({self.settings.queue_capacity} requests waiting, "
                f"{len(self._running)} running); retry later or on another replica", retry_after_s=0.5)
        heapq.heappush(self._waiting, (int(seq.traffic_class), next(self._order), seq))
        self._wake.set()

    def cancel(self, seq: Sequence) -> None:
        """Mark for removal; the loop drops it before the next step and frees its cache."""
        if seq.finished or seq.cancelled:
            return
        seq.cancelled = True
        if seq.phase is Phase.WAITING:
            self._waiting = [entry for entry in self._waiting if entry[2] is not seq]
            heapq.heapify(self._waiting)
            self.counters.cancelled_total += 1
        self._wake.set()

    # ---- the loop ------------------------------------------------------------------------------
    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while not self._stopping:
            plan = self._plan()
            if not (plan.leaving or plan.decode or plan.prefill):
                self._wake.clear()
                await self._wake.wait()
                continue
            try:
                events = await loop.run_in_executor(self._executor, self._step, plan)
            except Exception:
                log.exception("inference_step_failed")
                events = [(seq, seq.fail()) for seq in [*plan.decode, *(s for s, _ in plan.prefill)]]
                for seq, _ in events:
                    self._drop(seq)
            for seq, delta in events:
                seq.events.put_nowait(delta)
            self._running = [s for s in self._running if not s.finished]

    def _plan(self) -> StepPlan:
        plan = StepPlan()
        for seq in self._running:
            if seq.cancelled:
                plan.leaving.append(seq)
                self.counters.cancelled_total += 1
        self._running = [s for s in self._running if not s.cancelled]
        while self._waiting and len(self._running) < self.settings.max_batch_size:
            _, _, seq = heapq.heappop(self._waiting)
            seq.phase = Phase.PREFILL
            self._running.append(seq)
        plan.decode = [s for s in self._running if s.phase is Phase.DECODE]
        budget = self.settings.max_batched_tokens - len(plan.decode)
        chunk = min(self.settings.prefill_chunk, self.settings.max_batched_tokens)
        for seq in self._running:
            if seq.phase is not Phase.PREFILL:
                continue
            start = seq.prefilled
            size = min(chunk - start % chunk, len(seq.prompt_ids) - start)
            if plan.prefill and size > budget:
                break
            plan.prefill.append((seq, size))
            budget -= size
        return plan

    # ---- one step, on the worker thread -----------------------------------------------------
    def _step(self, plan: StepPlan) -> list[tuple[Sequence, Delta]]:
        events: list[tuple[Sequence, Delta]] = []
        for seq in plan.leaving:
            self._drop(seq)
        for group in self._groups:
            members = [s for s in plan.decode if self._where.get(s.seq_id) is group]
            if members:
                events += self._decode(group, members)
        for seq, size in plan.prefill:
            delta = self._prefill(seq, size)
            if delta is not None:
                events.append((seq, delta))
        generated = sum(1 for _ in events)
        self.counters.generated_total += generated
        self.counters.steps += 1
        self.counters.recent.append((time.monotonic(), self.counters.generated_total))
        self.counters.kv_tokens = sum(g.tokens for g in self._groups) + sum(
            s.kv[0].shape[2] for s in self._running if s.kv is not None)
        return events

    def _decode(self, group: DecodeBatch, members: list[Sequence]) -> list[tuple[Sequence, Delta]]:
        by_key = {s.seq_id: s for s in members}
        rows = [by_key[k] for k in group.keys]  # type: ignore[index]
        mask, cache = group.step_inputs()
        ids = np.array([[s.next_token] for s in rows], dtype=np.int64)
        logits = self.runner.decode(ids, mask, cache)
        group.advance()
        events = []
        for row, seq in enumerate(rows):
            delta = seq.choose(logits[row])
            events.append((seq, delta))
            if seq.finished:
                self._drop(seq)
        return events

    def _prefill(self, seq: Sequence, size: int) -> Delta | None:
        start = seq.prefilled
        past = seq.kv if seq.kv is not None else self.spec.empty()
        ids = np.array([seq.prompt_ids[start : start + size]], dtype=np.int64)
        mask = np.ones((1, start + size), dtype=np.int64)
        logits, presents = self.runner.prefill(ids, mask, past)
        seq.kv, seq.prefilled = presents, start + size
        if seq.prefilled < len(seq.prompt_ids):
            return None
        delta = seq.choose(logits[0])
        if not seq.finished:
            group = self._group_with_room()
            group.add(seq.seq_id, seq.kv)
            self._where[seq.seq_id] = group
            seq.kv = None
            seq.phase = Phase.DECODE
        return delta

    def _group_with_room(self) -> DecodeBatch:
        open_groups = [g for g in self._groups if len(g) < g.capacity]
        if open_groups:
            return min(open_groups, key=len)
        group = DecodeBatch(self.spec, self.settings.decode_rows, self.runner.device)
        self._groups.append(group)
        return group

    def _drop(self, seq: Sequence) -> None:
        seq.kv = None
        group = self._where.pop(seq.seq_id, None)
        if group is not None:
            group.remove(seq.seq_id)
            if not len(group):
                self._groups.remove(group)

    def kv_bytes(self) -> int:
        return self.counters.kv_tokens * self.spec.bytes_per_token

