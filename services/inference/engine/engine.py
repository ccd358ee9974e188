"""The facade the servicer calls: generate (a stream of deltas), count_tokens, model_info, load_report."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable

import structlog

from services.common.errors import InvalidInput
from services.common.generation import ChatMessage, Role
from services.common.usage import UsageStatus
from services.inference.engine.kv_budget import budget_tokens, default_kv_budget, fit_max_tokens
from services.inference.engine.metrics import EngineMetrics
from services.inference.engine.model import LoadedModel
from services.inference.engine.prefix_cache import PrefixCache, block_keys, chunking_is_exact, root_key
from services.inference.engine.sampling import Sampler
from services.inference.engine.scheduler import Scheduler, SchedulerSettings
from services.inference.engine.sequence import Sequence
from services.inference.engine.types import (
    Delta,
    FinishedSequence,
    FinishReason,
    GenerationRequest,
    LoadReport,
    ModelInfo,
    StreamSettings,
)
from services.inference.engine.validation import check_input, resolve_max_tokens, resolve_sampling

PRECISIONS = {"int8": "INT8", "fp32": "FP32", "fp16": "FP16", "int4": "INT4"}
# Inputs larger than this are rendered and tokenized on a worker thread (the tokenizer releases the
# GIL), so one caller's huge prompt never stalls the event loop for the others.
INLINE_TEXT_CHARS = 16 * 1024

log = structlog.get_logger(__name__)


class Engine:
    def __init__(self, model: LoadedModel, settings: SchedulerSettings, replica_id: str = "inference-0") -> None:
        self.model = model
        self.settings = settings
        self.replica_id = replica_id
        self.metrics = EngineMetrics(replica_id, self.load_report)
        # Called with every sequence that leaves the engine (engine-side metering); must not block.
        self.on_finished: Callable[[FinishedSequence], None] | None = None
        context = model.manifest.context_window
        self.kv_budget = settings.kv_budget_bytes or default_kv_budget(model.spec, context, settings.max_batch_size)
        self.prefix, block = self._prefix_cache()
        self.scheduler = Scheduler(model.runner, model.spec, settings, max_width=context, kv_budget=self.kv_budget,
                                   observer=self.metrics, prefix=self.prefix, block=block,
                                   min_decode_rows=min_decode_rows(model.manifest.precision))
        self._eos = frozenset(model.manifest.tokens.eos)

    def _prefix_cache(self) -> tuple[PrefixCache | None, int]:
        """The prefix cache and its block size: off when disabled or on a device (its slots are not
        copied there); whole prefill chunks when this model's prefill is not exact across cuts."""
        settings = self.settings
        if not settings.prefix_cache or settings.prefix_cache_bytes == 0 or self.model.runner.device != "cpu":
            return None, 0
        block = settings.prefix_block_tokens
        if block != settings.prefill_chunk and not chunking_is_exact(self.model.runner, self.model.spec, block):
            log.warning("prefix_cache_whole_chunks", block=block, prefill_chunk=settings.prefill_chunk)
            block = settings.prefill_chunk
        return PrefixCache(settings.prefix_cache_bytes), block

    async def start(self) -> None:
        self.scheduler.start()
        self.metrics.start()

    async def stop(self) -> None:
        self.metrics.stop()
        await self.scheduler.stop()

    # ---- token counting -------------------------------------------------------------------
    def prompt_ids(self, prompt: str, messages: tuple[ChatMessage, ...]) -> list[int]:
        check_input(prompt, messages)
        text = self.model.template.render(messages) if messages else prompt
        return self.model.encode(text)

    async def count_tokens(self, prompt: str, messages: tuple[ChatMessage, ...]) -> int:
        check_input(prompt, messages)
        self._check_length_bound(prompt, messages, self.model.manifest.context_window)
        if _text_size(prompt, messages) > INLINE_TEXT_CHARS:
            return len(await asyncio.to_thread(self.prompt_ids, prompt, messages))
        return len(self.prompt_ids(prompt, messages))

    def _check_length_bound(self, prompt: str, messages: tuple[ChatMessage, ...], limit: int) -> None:
        """Before tokenizing: text of at least `limit` + 1 tokens (a token is at most `max_token_bytes`
        bytes, a character at least one) is refused without the work."""
        size = _text_size(prompt, messages)
        at_least = size // self.model.max_token_bytes
        if at_least > limit:
            field = "messages" if messages else "prompt"
            raise InvalidInput(
                f"the {field} has {size} characters, so at least {at_least} tokens: more than this replica "
                f"takes ({limit} tokens, its context window or KV budget); shorten it", field=field)

    # ---- generation -------------------------------------------------------------------------
    def prepare(self, request: GenerationRequest) -> Sequence:
        """Validate and tokenize; raises InvalidInput with the field and the allowed range."""
        sampling = resolve_sampling(request.sampling, self.model.defaults)
        ids = self.prompt_ids(request.prompt, request.messages)
        max_tokens = resolve_max_tokens(request, len(ids), self.model.manifest.context_window,
                                        self.model.defaults)
        max_tokens = fit_max_tokens(len(ids), max_tokens, request.sampling.max_tokens is not None,
                                    self.model.spec, self.kv_budget)
        seq = Sequence.create(request.request_id, ids, max_tokens, Sampler(sampling), request.sampling.stop,
                              self.model.decode, self._eos, request.traffic_class)
        if self.prefix is not None:
            seq.prefix_root = root_key(self.model.manifest_sha256, request.tenant_id)
            seq.prefix_keys = block_keys(seq.prefix_root, ids, self.scheduler.block,
                                         self.settings.prefix_cache_max_prompt_tokens)
            seq.warm = bool(request.messages)  # a chat turn: its answer begins the next turn's history
            # a conversation that has gone on before is likely to go on: its answer is cached as it is decoded
            seq.eager = any(m.role == Role.ASSISTANT for m in request.messages)
        return seq

    async def admit(self, request: GenerationRequest) -> Sequence:
        """Queue room and a length bound first, then sampling checks, then tokenizing (on a worker
        thread for large inputs)."""
        self.scheduler.check_room()
        check_input(request.prompt, request.messages)
        limit = min(self.model.manifest.context_window, budget_tokens(self.model.spec, self.kv_budget))
        self._check_length_bound(request.prompt, request.messages, limit)
        resolve_sampling(request.sampling, self.model.defaults)
        if _text_size(request.prompt, request.messages) > INLINE_TEXT_CHARS:
            return await asyncio.to_thread(self.prepare, request)
        return self.prepare(request)

    async def generate(self, request: GenerationRequest) -> AsyncIterator[Delta]:
        start_us = time.time_ns() // 1000
        seq = await self.admit(request)
        self.scheduler.submit(seq)
        try:
            async for delta in coalesce(seq.events, request.stream):
                yield delta
        finally:
            self.scheduler.cancel(seq)
            if self.on_finished is not None:  # a buffer append: nothing here waits for billing
                self.on_finished(FinishedSequence(
                    request, self.replica_id, len(seq.prompt_ids), len(seq.generated), _status(seq), start_us,
                    time.time_ns() // 1000))

    # ---- reports ------------------------------------------------------------------------------
    def model_info(self) -> ModelInfo:
        manifest = self.model.manifest
        precision = next((v for k, v in PRECISIONS.items() if manifest.precision.startswith(k)), "UNSPECIFIED")
        return ModelInfo(name=manifest.name, version=manifest.version, context_window=manifest.context_window,
                         vocab_size=manifest.vocab_size, precision=precision,
                         execution_provider=self.model.provider, manifest_sha256=self.model.manifest_sha256,
                         max_batch_size=self.settings.max_batch_size, replica_id=self.replica_id)

    def load_report(self) -> LoadReport:
        scheduler, counters = self.scheduler, self.scheduler.counters
        return LoadReport(
            replica_id=self.replica_id, queue_depth=scheduler.queue_depth,
            queue_capacity=self.settings.queue_capacity, active_sequences=scheduler.active,
            max_batch_size=self.settings.max_batch_size, kv_cache_tokens=counters.kv_tokens,
            kv_cache_bytes=scheduler.kv_bytes(), tokens_per_second=counters.tokens_per_second(),
            cancelled_total=counters.cancelled_total, generated_total=counters.generated_total,
            ready=scheduler.running, prefill_tokens_total=counters.prefill_tokens_total,
            steps_after_cancel_total=counters.steps_after_cancel_total, kv_budget_bytes=self.kv_budget,
            **self._prefix_report())

    def _prefix_report(self) -> dict[str, int]:
        if self.prefix is None:
            return {}
        stats = self.prefix.stats
        return {"prefix_cache_hits": stats.hits, "prefix_cache_misses": stats.misses,
                "prefix_cache_blocks": stats.blocks, "prefix_cache_bytes": stats.bytes,
                "prefix_cache_warm_tokens": self.scheduler.counters.warm_tokens_total,
                "prefix_cache_eager_warm_tokens": self.scheduler.counters.eager_warm_tokens_total,
                "slots_taken_over_total": self.scheduler.counters.slots_taken_over_total,
                "slots_widened_total": self.scheduler.counters.slots_widened_total}


def min_decode_rows(precision: str) -> int:
    """The INT4 build's 4-bit MatMulNBits computes a one-row call with other kernels than a batched one
    (measured on AVX2: up to 2e-6 apart, grown to visible logit differences through the int8 activation
    rounding of later layers), so its decode steps always take two rows or more."""
    return 2 if precision.startswith("int4") else 1


def _status(seq: Sequence) -> UsageStatus:
    if seq.finish_reason in (FinishReason.STOP, FinishReason.LENGTH):
        return UsageStatus.COMPLETED
    return UsageStatus.FAILED if seq.finish_reason is FinishReason.ERROR else UsageStatus.CANCELLED


def _text_size(prompt: str, messages: tuple[ChatMessage, ...]) -> int:
    """Characters of the caller's text (no more than its UTF-8 bytes; the template only adds)."""
    return len(prompt) + sum(len(m.content) for m in messages)


async def coalesce(events: asyncio.Queue[Delta], stream: StreamSettings) -> AsyncIterator[Delta]:
    """Merge deltas so that at most one goes out per `coalesce_ms` and per `coalesce_tokens` tokens.

    Without either setting, a consumer that keeps up gets one message per token, and one that falls
    behind (a slow client or proxy, a busy event loop) gets everything already generated in one
    message instead of a backlog of single tokens (never more than `coalesce_tokens` when set).
    """
    timed = stream.coalesce_ms > 0 or stream.coalesce_tokens > 1
    while True:
        delta = await events.get()
        if delta.finish_reason is None:
            delta = await _gather(events, delta, stream) if timed else _drain(events, delta, stream.coalesce_tokens)
        yield delta
        if delta.finish_reason is not None:
            return


def _drain(events: asyncio.Queue[Delta], first: Delta, limit: int) -> Delta:
    """`first` merged with the deltas already waiting (up to `limit` tokens when > 0)."""
    if events.empty():
        return first
    text, ids = [first.text], list(first.token_ids)
    while not events.empty() and (limit <= 0 or len(ids) < limit):
        delta = events.get_nowait()
        text.append(delta.text)
        ids.extend(delta.token_ids)
        if delta.finish_reason is not None:
            return Delta("".join(text), tuple(ids), delta.finish_reason, delta.usage)
    return Delta("".join(text), tuple(ids))


async def _gather(events: asyncio.Queue[Delta], first: Delta, stream: StreamSettings) -> Delta:
    text, ids = [first.text], list(first.token_ids)
    deadline = time.monotonic() + stream.coalesce_ms / 1000 if stream.coalesce_ms > 0 else None
    limit = stream.coalesce_tokens if stream.coalesce_tokens > 0 else None
    while limit is None or len(ids) < limit:
        if deadline is None:
            delta = await events.get()
        else:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                delta = await asyncio.wait_for(events.get(), remaining)
            except TimeoutError:
                break
        text.append(delta.text)
        ids.extend(delta.token_ids)
        if delta.finish_reason is not None:
            return Delta("".join(text), tuple(ids), delta.finish_reason, delta.usage)
    return Delta("".join(text), tuple(ids))
