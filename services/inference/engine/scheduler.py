"""Continuous batching.

One long-lived decode thread runs the loop, so the event loop never sits between two model steps.
Before each step the thread drops cancelled sequences, admits waiting ones by priority
(core > interactive > batch) up to `max_batch_size` and while their KV reservations (prompt +
max_tokens) fit `kv_budget` bytes — the head of the queue waits for room, the rest wait behind it —
and plans the step: one decode row per running sequence plus prompt chunks (up to `prefill_chunk`
tokens, each prefilled on its own, straight into the sequence's cache slot, so the cache never
depends on the batch) while `max_batched_tokens` allows, at least one chunk per step. With the
prefix cache (prefix_cache.py), a prefilling sequence first copies the cached blocks its prompt
continues with into its slot; a block another sequence computes in this step is waited for, not
computed twice; each block its own chunks complete is added to the cache. An admitted
sequence takes a slot in a batch of its width class (kv_cache.py); its prompt done, it decodes at
the next step; a finished one leaves within the step that finished it, except that a finished chat
turn keeps its slot (a dummy row) while idle steps prefill its answer into the prefix cache (while few
sequences decode, most of the answer is prefilled as it is decoded, into a second slot that becomes
the turn's slot when it finishes: `_eager_warm`; a request
that arrives stops the warm-up call under way and ends the warm-ups), then stays parked: the
conversation's next turn takes that slot over and prefills from where the prefill KV it shares with
the slot ends, copying nothing in (a chat turn's history is mostly there already: copying it from the
cache into fresh pages was most of a late turn's time to first token). At most `max_parked` (a
quarter of `max_batch_size`) turns stay parked, the oldest going first, and parked slots are given
up, oldest first, whenever an admission needs their room. A parked slot whose next turn will not fit
its batch's width (its history plus a user turn and an answer as long as its answer allowance) is
moved to a batch of the wider class in an idle step, so that turn still takes it over. The step's deltas for
all sequences reach the event loop in one hand-off (`call_soon_threadsafe`), and each sequence's
consumer reads them from its queue.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import structlog

from services.common.errors import NotReady, QueueFull
from services.common.generation import FinishReason
from services.inference.engine.kv_cache import KvSpec, SlotBatch, width_class
from services.inference.engine.prefix_cache import Block, PrefixCache, history_keys
from services.inference.engine.sequence import Phase, Sequence
from services.inference.engine.session import CallGuard, DecodeBinding, Interrupted, ModelRunner
from services.inference.engine.types import Delta

log = structlog.get_logger(__name__)

WIDEN_COLUMNS = 256  # columns a parked slot's move copies between looks at the queue (a few ms)
EAGER_WARM_TOKENS = 16  # a decoding chat answer's tokens prefilled into its second slot per call


@dataclass
class Shadow:
    """A decoding chat turn's second slot: its prompt's columns copied in, then its answer prefilled
    there as it grows, so that columns [0, exact) are prefill KV while the first slot decodes on."""

    group: SlotBatch
    slot: int
    exact: int
    reserved: int  # bytes counted in the scheduler's reservations


@dataclass(frozen=True)
class SchedulerSettings:
    max_batch_size: int = 16
    max_batched_tokens: int = 256
    prefill_chunk: int = 128
    queue_capacity: int = 128
    decode_rows: int = 16  # rows per model call; larger batches run as several calls
    kv_budget_bytes: int = 0  # KV cache all admitted sequences may reserve; 0 = derived from the machine
    prefix_cache: bool = True  # keep prompt blocks for later requests with the same prefix
    prefix_cache_bytes: int = 256 * 1024 * 1024  # at most this much, inside kv_budget_bytes
    prefix_block_tokens: int = 8  # tokens per cached block; divides prefill_chunk
    prefix_cache_max_prompt_tokens: int = 2048  # a prompt (or conversation) caches at most its first N tokens
    # While at most this many sequences decode and none waits, the answer of a conversation's later turn
    # (an assistant message in its prompt) is prefilled into a second slot as it is decoded
    # (EAGER_WARM_TOKENS at a time), so a next turn sent the moment the answer ends finds it in the
    # cache; 0 = answers are prefilled in idle steps only.
    eager_warm_rows: int = 2

    def __post_init__(self) -> None:
        for name in ("max_batch_size", "max_batched_tokens", "prefill_chunk", "queue_capacity", "decode_rows"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.prefix_block_tokens < 1 or self.prefill_chunk % self.prefix_block_tokens:
            raise ValueError(f"prefix_block_tokens must divide prefill_chunk ({self.prefill_chunk}), "
                             f"got {self.prefix_block_tokens}")
        if self.eager_warm_rows < 0:
            raise ValueError(f"eager_warm_rows must be >= 0, got {self.eager_warm_rows}")
        if self.prefix_cache_max_prompt_tokens < 0:
            raise ValueError(f"prefix_cache_max_prompt_tokens must be >= 0, got {self.prefix_cache_max_prompt_tokens}")
        if self.prefix_cache_bytes < 0:
            raise ValueError(f"prefix_cache_bytes must be >= 0, got {self.prefix_cache_bytes}")
        if self.kv_budget_bytes < 0:
            raise ValueError(f"kv_budget_bytes must be >= 0 (0 = derived from the machine), got {self.kv_budget_bytes}")


@dataclass
class StepPlan:
    leaving: list[Sequence] = field(default_factory=list)
    admitted: list[Sequence] = field(default_factory=list)
    decode: list[Sequence] = field(default_factory=list)
    prefill: list[tuple[Sequence, int]] = field(default_factory=list)
    reuse: list[tuple[Sequence, list[Block]]] = field(default_factory=list)  # cached blocks to copy in
    abandon: list[Sequence] = field(default_factory=list)  # parked turns given up (room, or too many)
    warm: Sequence | None = None  # the finished sequence whose answer this idle step prefills
    widen: Sequence | None = None  # the parked turn this idle step moves to a wider batch


@dataclass
class Counters:
    cancelled_total: int = 0
    # Model steps cancelled sequences ran after their cancel arrived (a step already under way: at most 1).
    steps_after_cancel_total: int = 0
    generated_total: int = 0
    kv_tokens: int = 0
    steps: int = 0
    prefill_tokens_total: int = 0  # prompt tokens run through the model (cache hits not included)
    warm_tokens_total: int = 0  # answers' tokens prefilled into the prefix cache (idle steps, or while decoding)
    warm_stopped_total: int = 0  # warm-up calls stopped part-way because a request arrived
    eager_warm_tokens_total: int = 0  # of those, answer tokens prefilled into a second slot while decoding
    slots_taken_over_total: int = 0  # chat turns that took over their conversation's slot (nothing copied in)
    tokens_taken_over_total: int = 0  # the prompt tokens those turns found in the slot
    slots_widened_total: int = 0  # parked turns moved, in idle steps, to a batch wide enough for their next turn
    recent: deque[tuple[float, int]] = field(default_factory=lambda: deque(maxlen=256))

    def tokens_per_second(self, window_s: float = 2.0) -> float:
        now = time.monotonic()
        points = [(t, n) for t, n in self.recent if now - t <= window_s]
        if len(points) < 2:
            return 0.0
        (t0, n0), (_, n1) = points[0], points[-1]
        return (n1 - n0) / (now - t0) if now > t0 else 0.0


class StepObserver(Protocol):
    """Told about each step from the decode thread (metrics)."""

    def first_token(self, seconds: float) -> None: ...

    def decode_step(self, rows: int) -> None: ...


class _NoObserver:
    def first_token(self, seconds: float) -> None:
        pass

    def decode_step(self, rows: int) -> None:
        pass


class Scheduler:
    def __init__(self, runner: ModelRunner, spec: KvSpec, settings: SchedulerSettings, *, max_width: int,
                 kv_budget: int, observer: StepObserver | None = None, prefix: PrefixCache | None = None,
                 block: int = 0, min_decode_rows: int = 1) -> None:
        self.runner = runner
        self.spec = spec
        self.settings = settings
        self.max_width = max_width  # the longest cache a model call may see (the context window)
        self.kv_budget = kv_budget
        self.reserved_bytes = 0  # the admitted sequences' reservations (decode thread)
        self.counters = Counters()
        self._observer = observer or _NoObserver()
        self.prefix = prefix
        self.block = block  # tokens per prefix-cache block
        # rows a decode step runs at least (dummy rows beside one sequence): 2 for a model whose one-row
        # matmuls take another kernel than batched ones (the INT4 build on AVX2), so a row's tokens never
        # depend on whether it decodes alone
        self.min_decode_rows = min_decode_rows
        self._waiting: list[tuple[int, int, Sequence]] = []
        self._order = itertools.count()
        self._running: list[Sequence] = []  # owned by the decode thread
        self._warming: deque[Sequence] = deque()  # finished, their answers not yet in the prefix cache
        self._parked: deque[Sequence] = deque()  # finished chat turns whose slots wait for their next turn
        self.max_parked = max(1, settings.max_batch_size // 4)
        self._widening: deque[Sequence] = deque()  # parked turns whose next turn will not fit their batch
        self._warm_call: CallGuard | None = None  # the warm-up call under way, stopped by a submit
        self._shadows: dict[int, Shadow] = {}  # decoding chat turns' second slots, by seq_id
        self._groups: list[SlotBatch] = []
        self._where: dict[int, tuple[SlotBatch, int]] = {}
        self._by_id: dict[int, Sequence] = {}
        self._bindings: dict[SlotBatch, tuple[int, DecodeBinding]] = {}
        self._wake = threading.Condition(threading.Lock())
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping = False

    # ---- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is None:
            self._loop = asyncio.get_running_loop()
            self._thread = threading.Thread(target=self._run, name="inference-decode", daemon=True)
            self._thread.start()

    async def stop(self) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._thread is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._thread.join)
        for seq in [*self._running, *(s for _, _, s in self._waiting)]:
            if not seq.finished:
                seq.events.put_nowait(seq.fail())
        self._running, self._waiting = [], []

    # ---- what the engine calls (event loop thread) -------------------------------------------
    @property
    def running(self) -> bool:
        return self._thread is not None and not self._stopping

    @property
    def queue_depth(self) -> int:
        return len(self._waiting)

    @property
    def active(self) -> int:
        return len(self._running)

    def check_room(self) -> None:
        """NotReady / QueueFull now, before a request costs any work (submit checks again)."""
        if self._stopping or self._thread is None:
            raise NotReady("the inference engine is not running; retry on another replica")
        if len(self._waiting) >= self.settings.queue_capacity:
            raise QueueFull(
                f"the admission queue is full ({self.settings.queue_capacity} requests waiting, "
                f"{len(self._running)} running); retry later or on another replica", retry_after_s=0.5)

    def submit(self, seq: Sequence) -> None:
        with self._wake:
            self.check_room()
            seq.submitted_at = time.monotonic()
            heapq.heappush(self._waiting, (int(seq.traffic_class), next(self._order), seq))
            if self._warm_call is not None:  # idle work gives way at once: a request waits for no warm-up
                self._warm_call.stop()
            self._wake.notify()

    def cancel(self, seq: Sequence) -> None:
        """Mark for removal; the decode thread drops it before its next step and frees its cache."""
        with self._wake:
            if seq.finished or seq.cancelled:
                return
            seq.cancelled = True
            seq.cancelled_at_step = self.counters.steps
            if seq.phase is Phase.WAITING:
                self._waiting = [entry for entry in self._waiting if entry[2] is not seq]
                heapq.heapify(self._waiting)
                self.counters.cancelled_total += 1
            self._wake.notify()

    # ---- the loop (decode thread) ---------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._stopping and not (self._running or self._waiting or self._warming
                                                  or self._widening):
                    self._wake.wait()
                if self._stopping:
                    return
                plan = self._plan()
            events = self._execute(plan)
            self._running = [s for s in self._running if not s.finished]
            if events and not self._publish_soon(events):
                return

    def _publish_soon(self, events: list[tuple[Sequence, Delta]]) -> bool:
        """Hand one step's deltas to the event loop in a single call; False once the loop is gone."""
        assert self._loop is not None
        try:
            self._loop.call_soon_threadsafe(_publish, events)
        except RuntimeError:  # the event loop closed under us (interpreter shutdown)
            return False
        return True

    def _execute(self, plan: StepPlan) -> list[tuple[Sequence, Delta]]:
        try:
            return self._step(plan)
        except Exception:
            log.exception("inference_step_failed")
            involved = dict.fromkeys([*plan.admitted, *plan.decode, *(s for s, _ in plan.prefill)])
            failed = [(seq, seq.fail()) for seq in involved if not seq.finished]
            for seq, _ in failed:
                self._drop(seq)
            if plan.warm is not None:
                self._end_warm(plan.warm, keep=False)
            return failed

    def _plan(self) -> StepPlan:
        plan = StepPlan()
        for seq in self._running:
            if seq.cancelled and not seq.finished:
                plan.leaving.append(seq)
                self._unpin(seq)
        self._running = [s for s in self._running if not s.cancelled]
        if self._waiting:  # a request waits: warm-ups give way (their slots wait, parked, for a next turn)
            for seq in self._warming:
                self._park(seq)
            self._warming = deque()
        reserved = self.reserved_bytes - sum(self._reservation(s) for s in plan.leaving)
        while self._waiting and len(self._running) < self.settings.max_batch_size:
            seq = self._waiting[0][2]
            donor = self._donor(seq)
            need = self._reservation(seq) - (self._reservation(donor) if donor is not None else 0)
            while not self._room(reserved + need) and (others := [s for s in self._parked if s is not donor]):
                reserved -= self._give_up(others[0], plan)  # parked slots make room first, oldest first
            while not self._room(reserved + need) and self._shadows:
                reserved -= self._close_shadow(next(iter(self._shadows)))  # then second slots
            if not self._room(reserved + need) and self._running:
                break  # waits for room; nothing behind it overtakes it
            heapq.heappop(self._waiting)
            reserved += need
            if donor is not None:
                self._take_over(seq, donor)
            seq.phase = Phase.PREFILL
            self._running.append(seq)
            plan.admitted.append(seq)
        plan.decode = [s for s in self._running if s.phase is Phase.DECODE]
        budget = self.settings.max_batched_tokens - len(plan.decode)
        computing: set[bytes] = set()  # blocks this step's chunks complete
        for seq in self._running:
            if seq.phase is not Phase.PREFILL:
                continue
            start = seq.prefilled + self._block * len(self._reuse(seq, plan))
            if self._cacheable(seq, start) and seq.prefix_keys[start // self._block] in computing:
                continue  # another sequence computes its next block in this step
            size = self._chunk_size(start, len(seq.prompt_ids))
            if plan.prefill and size > budget:
                break
            plan.prefill.append((seq, size))
            budget -= size
            if self._cacheable(seq, start):
                computing.update(seq.prefix_keys[start // self._block : (start + size) // self._block])
        if not self._running and self._warming:
            plan.warm = self._warming[0]
        elif not self._running and not self._waiting:
            while self._widening and plan.widen is None:
                if (seq := self._widening.popleft()) in self._parked:
                    plan.widen = seq
        return plan

    def _give_up(self, seq: Sequence, plan: StepPlan) -> int:
        """Drop a parked turn at this step (its slot goes); returns its reservation."""
        self._parked.remove(seq)
        plan.abandon.append(seq)
        return self._reservation(seq)

    def _donor(self, seq: Sequence) -> Sequence | None:
        """The parked turn whose slot holds the longest exact start of `seq`'s prompt (whole blocks its
        hash chain shares, all prefill KV), in a batch wide enough for `seq`; None when none holds any."""
        best, best_blocks = None, 0
        if self.prefix is None or not seq.prefix_keys:
            return None
        width = width_class(seq.reserved_tokens, self.max_width)
        for parked in self._parked:
            if parked.prefix_root != seq.prefix_root or self._where[parked.seq_id][0].width < width:
                continue
            blocks = len(self._shared_keys(seq, parked))
            if blocks > best_blocks:
                best, best_blocks = parked, blocks
        return best

    def _shared_keys(self, seq: Sequence, parked: Sequence) -> list[bytes]:
        """The leading block keys of `seq`'s prompt that `parked`'s slot holds as prefill KV."""
        shared = []
        for mine, theirs in zip(seq.prefix_keys, parked.warm_keys[: parked.exact // self._block], strict=False):
            if mine != theirs:
                break
            shared.append(mine)
        return shared

    def _take_over(self, seq: Sequence, donor: Sequence) -> None:
        """`seq` takes `donor`'s slot: the columns of the blocks they share are its prompt's prefill KV
        already (bit for bit what copying the cached blocks in would write), so it prefills from there;
        those blocks are pinned for it, as hits, as far as the cache still holds them."""
        assert self.prefix is not None
        self._parked.remove(donor)
        shared = 0
        for key in self._shared_keys(seq, donor):
            if self.prefix.take(key) is None:
                break
            seq.pinned.append(key)
            shared += 1
        group, slot = self._where.pop(donor.seq_id)
        self._by_id.pop(donor.seq_id, None)
        self.reserved_bytes -= self._reservation(donor)
        group.hand_over(slot, seq.seq_id)
        self._where[seq.seq_id] = (group, slot)
        self._by_id[seq.seq_id] = seq
        self.reserved_bytes += self._reservation(seq)
        seq.prefilled = shared * self._block
        group.prefilled(slot, seq.prefilled, False)
        self.counters.slots_taken_over_total += 1
        self.counters.tokens_taken_over_total += seq.prefilled

    def _chunk_size(self, start: int, length: int) -> int:
        """Tokens of the next prefill call from `start`. With blocks smaller than the chunk (the model
        cuts exactly, `chunking_is_exact`) a call takes up to a chunk from wherever the prompt stands,
        so the new tokens after a prefix hit are one call, not two either side of a chunk boundary; it
        never leaves a one-token call behind it. Otherwise calls keep the fixed chunk boundaries, which
        a hit replays exactly."""
        chunk, left = self._chunk, length - start
        if self._block >= chunk:
            return min(chunk - start % chunk, left)
        return chunk - 1 if left == chunk + 1 else min(chunk, left)

    @property
    def _chunk(self) -> int:
        return min(self.settings.prefill_chunk, self.settings.max_batched_tokens)

    @property
    def _block(self) -> int:
        return self.block or self.settings.prefill_chunk

    def _room(self, reserved: int) -> bool:
        """Whether `reserved` bytes of sequences fit beside the pinned cache blocks (evicting others)."""
        if self.prefix is None:
            return reserved <= self.kv_budget
        if reserved + self.prefix.pinned_bytes > self.kv_budget:
            return False
        self.prefix.evict_to(self.kv_budget - reserved)
        return True

    def _cacheable(self, seq: Sequence, start: int) -> bool:
        """Whether the block at `start` is one the cache may give or take for `seq`."""
        return (self.prefix is not None and start == self._block * len(seq.pinned)
                and start // self._block < len(seq.prefix_keys))

    def _reuse(self, seq: Sequence, plan: StepPlan) -> list[Block]:
        """The cached blocks `seq` continues with from where its prefill stands, pinned for it."""
        blocks: list[Block] = []
        while self.prefix is not None and self._cacheable(seq, seq.prefilled + self._block * len(blocks)):
            key = seq.prefix_keys[len(seq.pinned)]
            found = self.prefix.take(key)
            if found is None:
                break
            seq.pinned.append(key)
            blocks.append(found)
        if blocks:
            plan.reuse.append((seq, blocks))
        return blocks

    # ---- one step -------------------------------------------------------------------------------
    def _step(self, plan: StepPlan) -> list[tuple[Sequence, Delta]]:
        events: list[tuple[Sequence, Delta]] = []
        for seq in plan.leaving:
            self.counters.steps_after_cancel_total += max(0, self.counters.steps - seq.cancelled_at_step)
            self._drop(seq)
        for seq in plan.abandon:
            self._drop(seq)
        if plan.warm is not None:
            self._warm(plan.warm)
        if plan.widen is not None:
            self._widen(plan.widen)
        for seq in plan.admitted:
            if seq.seq_id not in self._where:  # else it took over its conversation's slot
                self._place(seq)
        for group in list(self._groups):
            if group.decoding.any():
                events += self._decode(group)
        for seq, blocks in plan.reuse:  # after the decode: a dummy row's write at its length is overwritten
            self._copy_in(seq, blocks)
        for seq, size in plan.prefill:
            delta = self._prefill(seq, size)
            if delta is not None:
                events.append((seq, delta))
                self._observer.first_token(time.monotonic() - seq.submitted_at)
                if seq.finished:
                    self._finish(seq)
        self._eager_warm()
        self.counters.generated_total += len(events)
        self.counters.steps += 1
        self.counters.recent.append((time.monotonic(), self.counters.generated_total))
        self.counters.kv_tokens = sum(g.tokens for g in self._groups)
        self.counters.cancelled_total += len(plan.leaving)  # counted once their cache is gone
        return events

    def _decode(self, group: SlotBatch) -> list[tuple[Sequence, Delta]]:
        """One model call over the batch's bound slots; free and prefilling slots ride along as
        dummy rows whose logits are ignored (their written column is overwritten before it is read)."""
        slots = np.flatnonzero(group.decoding[: group.bound])
        rows: list[Sequence] = [self._by_id[group.keys[i]] for i in slots]  # type: ignore[index]
        ids = np.zeros((group.bound, 1), dtype=np.int64)
        ids[slots, 0] = [s.next_token for s in rows]
        logits = self._binding(group).run(ids, group.step_mask())
        group.advance()
        self._observer.decode_step(len(rows))
        events = []
        for seq, token in zip(rows, choose_tokens(rows, logits[slots]), strict=True):
            events.append((seq, seq.accept(token)))
            if seq.finished:
                self._finish(seq)
        return events

    def _binding(self, group: SlotBatch) -> DecodeBinding:
        epoch, binding = self._bindings.get(group, (-1, None))  # type: ignore[arg-type]
        if binding is None or epoch != group.epoch:
            binding = self.runner.decode_binding(group.step_view())
            self._bindings[group] = (group.epoch, binding)
        return binding

    def _prefill(self, seq: Sequence, size: int) -> Delta | None:
        group, slot = self._where[seq.seq_id]
        start = seq.prefilled
        ids = np.array([seq.prompt_ids[start : start + size]], dtype=np.int64)
        mask = np.zeros((1, group.width), dtype=np.int64)
        mask[0, : start + size] = 1
        logits = self.runner.prefill(ids, mask, group.slot_view(slot))
        self.counters.prefill_tokens_total += size
        seq.prefilled = start + size
        self._copy_out(seq, group, slot)
        done = seq.prefilled == len(seq.prompt_ids)
        group.prefilled(slot, seq.prefilled, done)
        if not done:
            return None
        seq.phase = Phase.DECODE
        return seq.choose(logits[0])

    def _copy_in(self, seq: Sequence, blocks: list[Block]) -> None:
        group, slot = self._where[seq.seq_id]
        for block in blocks:
            group.write_columns(slot, seq.prefilled, block.data)
            seq.prefilled += self._block
        group.prefilled(slot, seq.prefilled, False)

    def _copy_out(self, seq: Sequence, group: SlotBatch, slot: int) -> None:
        """Add the blocks the sequence's prefill completed to the cache (until one finds no room)."""
        while self.prefix is not None and self._cacheable(seq, start := self._block * len(seq.pinned)):
            if start + self._block > seq.prefilled:
                return
            key = seq.prefix_keys[len(seq.pinned)]
            data = group.read_columns(slot, start, start + self._block)
            if not self.prefix.add(key, data, self.kv_budget - self.reserved_bytes):
                seq.prefix_keys = seq.prefix_keys[: len(seq.pinned)]  # no room: stop caching this prompt
                return
            seq.pinned.append(key)

    # ---- answers into the prefix cache (idle steps) ------------------------------------------
    def _finish(self, seq: Sequence) -> None:
        """A finished chat turn keeps its slot while its answer waits to be prefilled into the cache
        (decode-step KV is not prefill KV bit for bit, so decoded columns are never cached)."""
        self._unpin(seq)
        if (self.prefix is None or not seq.warm or self._block < 2 or self._chunk % self._block
                or seq.finish_reason not in (FinishReason.STOP, FinishReason.LENGTH)):
            self._drop(seq)
            return
        history = [*seq.prompt_ids, *seq.generated]
        seq.warm_keys = history_keys(seq.prefix_root, history, self._block,
                                     self.settings.prefix_cache_max_prompt_tokens)
        seq.exact = len(seq.prompt_ids)
        group, slot = self._where[seq.seq_id]
        if (shadow := self._shadows.pop(seq.seq_id, None)) is not None:
            # its answer was prefilled into the second slot while it decoded: that slot is now its own
            self._free(group, slot)
            self.reserved_bytes -= shadow.reserved
            group, slot = shadow.group, shadow.slot
            group.hand_over(slot, seq.seq_id)
            self._where[seq.seq_id] = (group, slot)
            seq.exact = shadow.exact
        group.prefilled(slot, seq.exact, False)  # a dummy row from now on: it writes past its exact columns
        if all(key in self.prefix for key in seq.warm_keys):
            self._park(seq)  # nothing to warm (a retry, a regenerated answer): the next turn copies the rest
            return
        self._warming.append(seq)
        while len(self._warming) > self.settings.max_batch_size:
            self._drop(self._warming.popleft())

    def _warm(self, seq: Sequence) -> None:
        """One prefill call of the answer's next blocks, up to a chunk (cached ones are copied in, not
        recomputed), each completed block kept in the cache; a call of two or more tokens that starts and
        ends at block boundaries after exact columns only, so the blocks are those a cold prefill of the
        next turn makes. A request submitted meanwhile stops the call (its slot goes, with what the call
        wrote), so the next turn, sent as soon as the answer ends, never waits for a warm-up."""
        assert self.prefix is not None
        group, slot = self._where[seq.seq_id]
        keys, block = seq.warm_keys, self._block
        while seq.warmed < len(keys) and (found := self.prefix.get(keys[seq.warmed])) is not None:
            if (seq.warmed + 1) * block > seq.exact:
                group.write_columns(slot, seq.warmed * block, found.data)
                seq.exact = (seq.warmed + 1) * block
            seq.warmed += 1
        if seq.warmed == len(keys):
            self._end_warm(seq)
            return
        start = seq.warmed * block
        stop = min(start + self._chunk // block * block, len(keys) * block)
        history = [*seq.prompt_ids, *seq.generated]
        ran = self._stoppable_prefill(history[start:stop], group, slot, stop)
        if ran is None:  # a request arrived since the plan: the next plan gives the warm-ups up
            return
        if not ran:
            self._end_warm(seq)
            return
        self.counters.warm_tokens_total += stop - start
        seq.exact = stop
        group.prefilled(slot, stop, False)
        for i in range(seq.warmed, stop // block):
            data = group.read_columns(slot, i * block, (i + 1) * block)
            if not self.prefix.keep(keys[i], data, self.kv_budget - self.reserved_bytes):
                self._end_warm(seq)  # no room: the rest is not worth its memory
                return
            seq.warmed = i + 1
        if seq.warmed == len(keys):
            self._end_warm(seq)

    # ---- answers into the prefix cache while they are decoded ------------------------------------
    def _eager_warm(self) -> None:
        """While at most `eager_warm_rows` sequences decode and none waits, the answer of each decoding
        turn of a conversation that has gone on before (an assistant message in its prompt) is prefilled,
        EAGER_WARM_TOKENS or more at a time, into a second slot (`Shadow`) holding a copy of its prompt's
        columns: a next turn sent the moment the answer ends then finds the answer's blocks in the cache
        and the second slot parked for it, instead of prefilling the answer first. The decoding slot is
        never touched, so the answer's own tokens are those of a run without it. Each call delays that
        step's tokens by its prefill (about 16 prompt tokens' worth), which is why a busier replica
        leaves answers to its idle steps."""
        if (self.prefix is None or not self.settings.eager_warm_rows or self._block < 2 or self._chunk % self._block
                or self._waiting):
            return
        decoding = [s for s in self._running if s.phase is Phase.DECODE and not s.finished]
        if len(decoding) > self.settings.eager_warm_rows:
            return
        for seq in decoding:
            if seq.warm and seq.eager and not self._waiting:
                try:
                    self._shadow_warm(seq)
                except Exception:  # a second slot is an optimisation: its failure fails no request
                    log.exception("inference_eager_warm_failed", request_id=seq.request_id)
                    if seq.seq_id in self._shadows:
                        self._close_shadow(seq.seq_id)

    def _shadow_warm(self, seq: Sequence) -> None:
        assert self.prefix is not None
        block = self._block
        history = [*seq.prompt_ids, *seq.generated]
        stop = min(len(history), self.settings.prefix_cache_max_prompt_tokens) // block * block
        shadow = self._shadows.get(seq.seq_id)
        # the first call starts after the prompt's cached blocks (the last ones, too near the prompt's end
        # to be cached with it, are history blocks now)
        start = shadow.exact if shadow is not None else min(len(seq.prompt_ids), block * len(seq.pinned))
        if stop - start < EAGER_WARM_TOKENS:
            return
        if shadow is None and (shadow := self._open_shadow(seq, start)) is None:
            return
        group, slot = shadow.group, shadow.slot
        if not self._stoppable_prefill(history[start:stop], group, slot, stop):
            return  # a request goes first; columns a stopped call wrote lie past `exact`: nothing is lost
        self.counters.warm_tokens_total += stop - start
        self.counters.eager_warm_tokens_total += stop - start
        shadow.exact = stop
        group.prefilled(slot, stop, False)  # a dummy row: a decode step of its batch writes past `exact`
        keys = history_keys(seq.prefix_root, history, block, self.settings.prefix_cache_max_prompt_tokens)
        for i in range(start // block, stop // block):
            if keys[i] not in self.prefix:
                data = group.read_columns(slot, i * block, (i + 1) * block)
                if not self.prefix.keep(keys[i], data, self.kv_budget - self.reserved_bytes):
                    return  # no room now; what the slot holds still serves the next turn

    def _open_shadow(self, seq: Sequence, exact: int) -> Shadow | None:
        """A second slot for `seq` in a batch of its width that decodes nothing (so it adds no row to
        `seq`'s steps), with its first `exact` (prompt) columns copied in; None when the KV budget has no
        room for it."""
        group, slot = self._where[seq.seq_id]
        need = self._reservation(seq)
        if not self._room(self.reserved_bytes + need):
            return None
        quiet = [g for g in self._groups
                 if g is not group and g.width == group.width and g.has_room and not g.decoding.any()]
        target = quiet[0] if quiet else SlotBatch(self.spec, self.settings.decode_rows, group.width,
                                                   self.runner.device, self.min_decode_rows)
        if not quiet:
            self._groups.append(target)
        shadow = Shadow(target, target.take(("shadow", seq.seq_id)), exact, need)
        group.copy_columns(slot, target, shadow.slot, 0, shadow.exact)
        target.prefilled(shadow.slot, shadow.exact, False)
        self.reserved_bytes += need
        self._shadows[seq.seq_id] = shadow
        return shadow

    def _close_shadow(self, seq_id: int) -> int:
        """Give a second slot up; returns the reservation it frees."""
        shadow = self._shadows.pop(seq_id)
        self._free(shadow.group, shadow.slot)
        self.reserved_bytes -= shadow.reserved
        return shadow.reserved

    def _stoppable_prefill(self, ids: list[int], group: SlotBatch, slot: int, stop: int) -> bool | None:
        """Prefill `ids` into the slot up to column `stop` as idle work that a submitted request stops
        (ONNX Runtime's terminate): True when it ran, False when it was stopped part-way (counted), None
        when a request already waits (nothing ran)."""
        mask = np.zeros((1, group.width), dtype=np.int64)
        mask[0, :stop] = 1
        guard = CallGuard()
        with self._wake:
            if self._waiting:
                return None
            self._warm_call = guard
        try:
            self.runner.prefill(np.array([ids], dtype=np.int64), mask, group.slot_view(slot), guard=guard)
        except Interrupted:
            self.counters.warm_stopped_total += 1
            return False
        finally:
            with self._wake:
                self._warm_call = None
        return True

    def _end_warm(self, seq: Sequence, keep: bool = True) -> None:
        """The warm-up of `seq` is over (done, stopped or out of room): its slot is parked for the
        conversation's next turn to take over (`_take_over`); `keep=False`: dropped (a failed step)."""
        if seq in self._warming:
            self._warming.remove(seq)
        if keep:
            self._park(seq)
        else:
            self._drop(seq)

    def _park(self, seq: Sequence) -> None:
        """Keep a finished turn's slot for its conversation's next turn; the oldest parked beyond
        `max_parked` go. A slot whose batch the next turn will outgrow is moved to a wider one in an
        idle step (`_widen`), so that turn still finds it."""
        self._parked.append(seq)
        while len(self._parked) > self.max_parked:
            self._drop(self._parked.popleft())
        if seq in self._parked and self._next_width(seq) > self._where[seq.seq_id][0].width:
            self._widening.append(seq)

    def _next_width(self, seq: Sequence) -> int:
        """The width class the conversation's next turn is likely to need: its history, a user turn and an
        answer, each taken as long as this turn's answer allowance."""
        history = len(seq.prompt_ids) + len(seq.generated)
        return width_class(history + 2 * seq.max_tokens, self.max_width)

    def _widen(self, seq: Sequence) -> None:
        """Move a parked turn's exact columns into a slot of a batch of its next turn's width class, in
        pieces; a request that arrives meanwhile stops the move (the old slot stays, and is tried again
        at the next idle step). Done while idle, so that the next turn copies nothing on its way in."""
        old, old_slot = self._where[seq.seq_id]
        if self._next_width(seq) <= old.width:
            return
        group = self._group_for(self._next_width(seq))
        slot = group.take(seq.seq_id)
        for start in range(0, seq.exact, WIDEN_COLUMNS):
            if self._waiting:  # idle work gives way at once
                self._free(group, slot)
                self._widening.append(seq)
                return
            old.copy_columns(old_slot, group, slot, start, min(start + WIDEN_COLUMNS, seq.exact))
        group.prefilled(slot, seq.exact, False)
        self._free(old, old_slot)
        self._where[seq.seq_id] = (group, slot)
        self.counters.slots_widened_total += 1

    def _group_for(self, width: int) -> SlotBatch:
        """The fullest batch of this width with a free slot (a new batch when none has room)."""
        open_groups = [g for g in self._groups if g.width == width and g.has_room]
        if open_groups:
            return max(open_groups, key=len)
        group = SlotBatch(self.spec, self.settings.decode_rows, width, self.runner.device, self.min_decode_rows)
        self._groups.append(group)
        return group

    def _free(self, group: SlotBatch, slot: int) -> None:
        group.release(slot)
        if not len(group):
            self._groups.remove(group)
            self._bindings.pop(group, None)

    def _unpin(self, seq: Sequence) -> None:
        if self.prefix is not None:
            for key in seq.pinned:
                self.prefix.unpin(key)
        seq.pinned = []

    def _place(self, seq: Sequence) -> None:
        """A slot in the fullest batch of the sequence's width class (a new batch when none has room)."""
        group = self._group_for(width_class(seq.reserved_tokens, self.max_width))
        self._where[seq.seq_id] = (group, group.take(seq.seq_id))
        self._by_id[seq.seq_id] = seq
        self.reserved_bytes += self._reservation(seq)

    def _drop(self, seq: Sequence) -> None:
        self._unpin(seq)
        if seq.seq_id in self._shadows:
            self._close_shadow(seq.seq_id)
        self._by_id.pop(seq.seq_id, None)
        placed = self._where.pop(seq.seq_id, None)
        if placed is None:
            return
        self._free(*placed)
        self.reserved_bytes -= self._reservation(seq)

    def _reservation(self, seq: Sequence) -> int:
        return self.spec.bytes_for(seq.reserved_tokens)

    def kv_bytes(self) -> int:
        return self.counters.kv_tokens * self.spec.bytes_per_token


def choose_tokens(rows: list[Sequence], logits: np.ndarray) -> list[int]:
    """Next token of every row: plain greedy rows by one argmax over the batch (the same result as
    row by row, so batch invariance holds), the others through their own sampler."""
    if all(s.sampler.plain_greedy for s in rows):
        return logits.argmax(axis=1).tolist()  # type: ignore[no-any-return]
    return [int(logits[i].argmax()) if s.sampler.plain_greedy else s.sample(logits[i])
            for i, s in enumerate(rows)]


def _publish(events: list[tuple[Sequence, Delta]]) -> None:
    for seq, delta in events:
        seq.events.put_nowait(delta)
