"""Dispatch: an admitted plan's answer, from the cache, a generation in flight (single-flight) or a new
generation with retries and fallbacks.

A generation tries the planned version's replicas (least loaded first), then the stable version when a
canary fails, then the model's fallback models; it retries only before the first token reached the caller,
so nobody ever sees duplicated text, and only as the retry budget allows. Among a version's replicas it
prefers the one its prefix affinity key ranks first (`affinity_key`: the tenant with the conversation's
`context_id`, else with the prompt's leading characters), so a conversation's turns and a shared system
prompt meet the prompt blocks that replica already holds, unless that replica is loaded past the margin.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace

from services.common.errors import DomainError, FailedPrecondition, Internal, QueueFull, Unavailable
from services.common.generation import FinishReason
from services.common.usage import Usage
from services.router.balancer import Balancer
from services.router.cache import CachedAnswer, ResponseCache
from services.router.canary import CanaryMonitor
from services.router.gateway.plan import Plan
from services.router.lifecycle import VersionState
from services.router.ports import InferenceCall, InferencePort
from services.router.registry import ModelEntry, Registry, VersionEntry
from services.router.retry import RetryBudget, RetrySettings, backoff_delay
from services.router.single_flight import SingleFlight
from services.router.types import Chunk, RequestContext


@dataclass
class Progress:
    """What reached the caller so far."""

    parts: list[str] = field(default_factory=list)
    tokens: int = 0
    first_token_at: float | None = None
    final: Chunk | None = None
    cached: bool = False
    admitted: bool = False  # a slot of the priority gate was granted (the request may have reached a model)

    @property
    def text(self) -> str:
        return "".join(self.parts)


class Dispatcher:
    def __init__(self, registry: Registry, balancer: Balancer, inference: InferencePort, canary: CanaryMonitor,
                 cache: ResponseCache, flights: SingleFlight[Chunk], retry: RetrySettings,
                 clock: Callable[[], float], rng: random.Random) -> None:
        self._registry = registry
        self._balancer = balancer
        self._inference = inference
        self._canary = canary
        self._cache = cache
        self._flights = flights
        self._retry = retry
        self._clock = clock
        self._rng = rng
        self._retry_budget = RetryBudget(retry, clock)

    def answer(
        self, ctx: RequestContext, plan: Plan, progress: Progress, hit: CachedAnswer | None,
        go: asyncio.Event | None = None,
    ) -> AsyncIterator[Chunk]:
        key = plan.cache_key
        if key is None:
            return self._generation(ctx, plan, go)
        if hit is None and not self._flights.in_flight(key):
            hit = self._cache.get(key)  # an identical request may have finished while this one waited for its hold
        if hit is not None:
            progress.cached = True
            return _replay(hit)

        def remember(chunks: list[Chunk]) -> None:
            if (answer := _answer_of(chunks)) is not None:
                self._cache.put(key, answer)

        stream, leader = self._flights.join(key, lambda: self._generation(ctx, plan, go), remember)
        progress.cached = not leader
        return stream

    def _candidates(self, plan: Plan) -> list[tuple[ModelEntry, VersionEntry]]:
        candidates = [(plan.model, plan.version)]
        stable = plan.model.stable
        if (stable.version != plan.version.version and not plan.request.model.count("@")
                and stable.state is VersionState.ACTIVE):
            candidates.append((plan.model, stable))  # a failing canary falls back to the stable version
        for name in plan.model.fallback_models:
            if name in self._registry and name != plan.model.name:
                try:
                    candidates.append((self._registry.get(name), self._registry.pick_version(name)))
                except FailedPrecondition:
                    continue  # a fallback model with no ACTIVE version serves nobody
        return candidates

    async def _generation(self, ctx: RequestContext, plan: Plan, go: asyncio.Event | None = None
                          ) -> AsyncIterator[Chunk]:
        """One generation with retries (before the first token only) across replicas and fallback models."""
        self._retry_budget.on_request()
        settings = self._retry
        last: DomainError = Unavailable("no inference replica could serve the request")
        attempt = 0
        candidates = self._candidates(plan)
        affinity = affinity_key(plan)
        for index, (model, version) in enumerate(candidates):
            call = InferenceCall(
                request_id=ctx.request_id, prompt=plan.prompt if plan.raw_prompt else "",
                messages=() if plan.raw_prompt else plan.messages, sampling=plan.sampling_max,  # type: ignore[arg-type]
                traffic_class=plan.traffic_class, coalesce_ms=plan.request.coalesce_ms,
                coalesce_tokens=plan.request.coalesce_tokens, tenant_id=plan.tenant_id,
                api_key_id=ctx.principal.key_id, model=model.name, model_version=version.version, tags=plan.tags,
                trace_id=ctx.trace_id,
            )
            tried: set[str] = set()
            for _ in range(settings.max_attempts):
                try:
                    address = self._balancer.pick(version.replicas, frozenset(tried), affinity)
                except Unavailable as exc:
                    if not tried:  # a version with no healthy replica counts as failing
                        await self._canary.record(model.name, version.version, False, 0.0)
                    if not isinstance(last, QueueFull | Internal):  # each says more than "no replica left"
                        last = exc
                    break
                tried.add(address)
                started = self._clock()
                delivered = 0
                try:
                    with self._balancer.track(address):
                        async for chunk in self._inference.generate(address, call, go):
                            if chunk.finish_reason != FinishReason.UNSPECIFIED:
                                chunk = replace(chunk, model=model.name, model_version=version.version)
                            delivered += chunk.tokens
                            yield chunk
                    await self._canary.record(model.name, version.version, True, self._clock() - started)
                    return
                except (Unavailable, QueueFull) as exc:
                    await self._canary.record(model.name, version.version, False, self._clock() - started)
                    if delivered:
                        raise Unavailable(
                            f"the replica serving this stream failed after {delivered} tokens; the tokens received"
                            " are billed, retry the request"
                        ) from exc
                    last = exc
                    if isinstance(exc, Unavailable):  # a full queue is overload, not ill health
                        self._balancer.health_check(address, ok=False)
                    attempt += 1
                    if not self._retry_budget.try_spend():
                        raise last from None
                    await asyncio.sleep(backoff_delay(attempt, settings, self._rng))
                except Internal as exc:
                    # The replica answered with a fault of its own, not a transport failure: another replica of
                    # this version would likely fail the same way, so it is not retried there. It counts against
                    # the version, and before the first token the request moves on to the next candidate (a
                    # canary falls back to stable) as the retry budget allows.
                    await self._canary.record(model.name, version.version, False, self._clock() - started)
                    if delivered or index == len(candidates) - 1 or not self._retry_budget.try_spend():
                        raise
                    last = exc
                    break
        raise last


AFFINITY_LEAD_CHARS = 128  # about 30 tokens, a few of the prefix cache's blocks


def affinity_key(plan: Plan) -> str:
    """What the replica choice keeps together so the prefix cache is met: a tenant's conversation
    (`context_id`), else a tenant's prompts that begin with the same AFFINITY_LEAD_CHARS characters
    (roles and contents in order: a shared system prompt, a conversation the client resends whole).
    Empty, no preference, for a prompt shorter than that: it holds too few blocks to steer for."""
    if plan.context_id:
        return f"{plan.tenant_id}\x00context\x00{plan.context_id}"
    if plan.raw_prompt:
        lead = plan.prompt[:AFFINITY_LEAD_CHARS]
    else:
        parts, size = [], 0
        for message in plan.messages:
            parts.append(f"{int(message.role)}:{message.content}\x00")
            size += len(parts[-1])
            if size >= AFFINITY_LEAD_CHARS:
                break
        lead = "".join(parts)[:AFFINITY_LEAD_CHARS]
    if len(lead) < AFFINITY_LEAD_CHARS:
        return ""
    return f"{plan.tenant_id}\x00prompt\x00{lead}"


def _answer_of(chunks: list[Chunk]) -> CachedAnswer | None:
    """What the cache keeps of a generation that ended well (None when it did not)."""
    final = chunks[-1] if chunks else None
    if final is None or final.usage is None or final.finish_reason in (FinishReason.UNSPECIFIED, FinishReason.ERROR,
                                                                       FinishReason.CANCELLED):
        return None
    return CachedAnswer("".join(c.delta for c in chunks), final.finish_reason, final.usage.prompt_tokens,
                        final.usage.completion_tokens, final.model, final.model_version)


async def _replay(answer: CachedAnswer) -> AsyncIterator[Chunk]:
    yield Chunk(delta=answer.text, tokens=answer.completion_tokens)
    yield Chunk(finish_reason=answer.finish_reason,
                usage=Usage(answer.prompt_tokens, answer.completion_tokens, cached=True),
                model=answer.model, model_version=answer.model_version)
