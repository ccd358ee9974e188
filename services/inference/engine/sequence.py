"""One generation in flight: its tokens, sampler, stop matching and the deltas it produced."""

from __future__ import annotations

import asyncio
import enum
import itertools
from dataclasses import dataclass, field

import numpy as np

from services.common.generation import FinishReason, TrafficClass
from services.common.usage import Usage
from services.inference.engine.detokenize import Decode, IncrementalDetokenizer
from services.inference.engine.sampling import Sampler
from services.inference.engine.stop import StopMatcher
from services.inference.engine.types import Delta

_ids = itertools.count(1)


class Phase(enum.Enum):
    WAITING = "waiting"
    PREFILL = "prefill"
    DECODE = "decode"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    request_id: str
    prompt_ids: list[int]
    max_tokens: int
    sampler: Sampler
    stop: StopMatcher
    detokenizer: IncrementalDetokenizer
    eos_ids: frozenset[int]
    traffic_class: TrafficClass = TrafficClass.INTERACTIVE
    seq_id: int = field(default_factory=lambda: next(_ids))
    generated: list[int] = field(default_factory=list)
    phase: Phase = Phase.WAITING
    prefilled: int = 0
    next_token: int = -1  # sampled, not yet in the cache
    finish_reason: FinishReason | None = None
    cancelled: bool = False
    cancelled_at_step: int = -1  # the scheduler's completed steps when the cancel arrived
    submitted_at: float = 0.0  # time.monotonic() when admitted to the queue
    events: asyncio.Queue[Delta] = field(default_factory=asyncio.Queue)
    prefix_keys: list[bytes] = field(default_factory=list)  # keys of its cacheable prompt blocks
    pinned: list[bytes] = field(default_factory=list)  # blocks 0..n-1 it holds in the prefix cache
    prefix_root: bytes = b""  # where its tenant's chains start (prefix_cache.root_key)
    warm: bool = False  # once finished, its answer is prefilled into the prefix cache (a chat turn)
    eager: bool = False  # and while few sequences decode, as it is decoded (a conversation's later turn)
    warm_keys: list[bytes] = field(default_factory=list)  # keys of its prompt + answer blocks, once finished
    warmed: int = 0  # blocks of warm_keys dealt with
    exact: int = 0  # its slot's columns [0, exact) hold prefill KV (the rest is decode KV)

    @classmethod
    def create(cls, request_id: str, prompt_ids: list[int], max_tokens: int, sampler: Sampler,
               stops: tuple[str, ...], decode: Decode, eos_ids: frozenset[int],
               traffic_class: TrafficClass) -> Sequence:
        return cls(request_id, prompt_ids, max_tokens, sampler, StopMatcher(stops),
                   IncrementalDetokenizer(decode), eos_ids, traffic_class)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def reserved_tokens(self) -> int:
        """The most tokens its cache can hold: what admission reserves for it."""
        return len(self.prompt_ids) + self.max_tokens

    @property
    def usage(self) -> Usage:
        return Usage(prompt_tokens=len(self.prompt_ids), completion_tokens=len(self.generated))

    def choose(self, logits: np.ndarray) -> Delta:
        """Sample the next token from this sequence's logits row and turn it into a delta."""
        return self.accept(self.sample(logits))

    def sample(self, logits: np.ndarray) -> int:
        seen = itertools.chain(self.prompt_ids, self.generated) if self.sampler.params.repetition_penalty != 1.0 else ()
        return self.sampler.choose(logits, seen)

    def accept(self, token: int) -> Delta:
        self.generated.append(token)
        self.next_token = token
        if token in self.eos_ids:
            return self._finish(FinishReason.STOP, "")
        matched = self.stop.push(self.detokenizer.push(token))
        if matched.stopped:
            return self._finish(FinishReason.STOP, matched.text, flush=False)
        if len(self.generated) >= self.max_tokens:
            return self._finish(FinishReason.LENGTH, matched.text)
        return Delta(matched.text, (token,))

    def fail(self) -> Delta:
        return self._finish(FinishReason.ERROR, "", flush=False)

    def _finish(self, reason: FinishReason, text: str, flush: bool = True) -> Delta:
        if flush:
            tail = self.stop.push(self.detokenizer.flush())
            text += tail.text if tail.stopped else tail.text + self.stop.flush()
            if tail.stopped:
                reason = FinishReason.STOP
        self.finish_reason = reason
        self.phase = Phase.FINISHED
        return Delta(text, (self.generated[-1],) if self.generated else (), reason, self.usage)
