"""The gateway both transports call: a request from an authenticated caller to a finished, billed answer,
through four rooms.

  plan (validate, policy, context, version, token bound, cache key)
  → admit (wait-queue room, rate limit, budget hold — overlapped with the prefill when billing allows —,
    priority slot)
  → dispatch (cache / single-flight / generation with retries and fallbacks before the first token)
  → account (one usage event: completed, cancelled with the tokens delivered, or failed; access log).

Closing or cancelling `generate()`'s iterator cancels the request and settles it in `finally`, so a
cancelled gRPC stream and a disconnected HTTP client are billed alike.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime

from services.common.generation import FinishReason, TrafficClass
from services.common.usage import UsageStatus
from services.router import offload
from services.router.admission import PriorityGate
from services.router.balancer import Balancer
from services.router.cache import ResponseCache
from services.router.canary import CanaryMonitor
from services.router.contexts import ContextStore
from services.router.gateway.account import Accountant
from services.router.gateway.admit import Admitter, EarlyStart
from services.router.gateway.dispatch import Dispatcher, Progress
from services.router.gateway.plan import Plan, Planner
from services.router.lifecycle import Deprecation
from services.router.limits.token_bucket import RateLimiter
from services.router.metering import Meter
from services.router.policy import PolicyStore
from services.router.ports import InferencePort
from services.router.prompt_tokens import PromptTokens
from services.router.registry import ModelEntry, Registry
from services.router.retry import RetrySettings
from services.router.single_flight import SingleFlight
from services.router.tasks import TaskSpec, render_task
from services.router.types import (
    Chunk,
    GenerationRequest,
    Message,
    Principal,
    RequestContext,
    Sampling,
    Summary,
)


@dataclass(frozen=True)
class GatewaySettings:
    default_max_tokens: int = 256
    retry: RetrySettings = field(default_factory=RetrySettings)
    hold_ttl_s: int = 300


class Gateway:
    def __init__(
        self,
        registry: Registry,
        balancer: Balancer,
        inference: InferencePort,
        meter: Meter,
        limiter: RateLimiter,
        cache: ResponseCache,
        contexts: ContextStore,
        policies: PolicyStore,
        canary: CanaryMonitor,
        gate: PriorityGate,
        settings: GatewaySettings | None = None,
        clock: Callable[[], float] = time.monotonic,
        wallclock: Callable[[], datetime] = lambda: datetime.now(UTC),
        rng: random.Random | None = None,
        prompt_tokens: PromptTokens | None = None,
    ) -> None:
        self.registry = registry
        self.balancer = balancer
        self.inference = inference
        self.meter = meter
        self.limiter = limiter
        self.cache = cache
        self.contexts = contexts
        self.policies = policies
        self.canary = canary
        self.gate = gate
        self.settings = settings or GatewaySettings()
        self._clock = clock
        self._wallclock = wallclock
        self.flights: SingleFlight[Chunk] = SingleFlight()
        self.planner = Planner(registry, balancer, inference, contexts, policies, self.settings.default_max_tokens,
                               prompt_tokens)
        self.prompt_tokens = self.planner.prompt_tokens
        self.admitter = Admitter(meter, limiter, cache, gate)
        self.dispatcher = Dispatcher(registry, balancer, inference, canary, cache, self.flights, self.settings.retry,
                                     clock, rng or random.Random())
        self.accountant = Accountant(meter, limiter, contexts, self.planner.exact_prompt, clock, wallclock)

    # --- simple reads ----------------------------------------------------------------------------
    def callable_models(self, principal: Principal) -> list[ModelEntry]:
        return self.planner.callable_models(principal)

    def check_model(self, principal: Principal, spec: str) -> None:
        """Raises unless this principal may call this (existing) model; a pinned version must serve
        pinned requests (ACTIVE or DEPRECATED)."""
        self.planner.check(principal, spec)

    def deprecation(self, spec: str) -> Deprecation | None:
        """The notice a request for `spec` carries when it pins a DEPRECATED version (None otherwise): the
        transports send it as gRPC trailing metadata and HTTP headers."""
        return self.registry.deprecation(spec)

    def healthy_replicas(self, model: ModelEntry) -> dict[str, int]:
        """Healthy replicas per version of `model`."""
        return {v.version: len(self.balancer.healthy(v.replicas)) for v in model.versions}

    async def count_tokens(
        self, principal: Principal, spec: str, prompt: str, messages: tuple[Message, ...], raw: bool
    ) -> tuple[int, int, str, str]:
        return await self.planner.count_tokens(principal, spec, prompt, messages, raw)

    async def plan(self, ctx: RequestContext, req: GenerationRequest) -> Plan:
        return await self.planner.plan(ctx, req)

    # --- the request path --------------------------------------------------------------------------
    async def generate(self, ctx: RequestContext, req: GenerationRequest) -> AsyncIterator[Chunk | Summary]:
        started, start_wall = self._clock(), self._wallclock()
        plan = await self.planner.plan(ctx, req)
        principal = ctx.principal
        if principal.tokens_per_minute:
            await self.planner.tighten(plan)  # the key's tokens/min take the prompt's exact count up front
        admission = await self.admitter.admit(principal, plan)
        hit = self.admitter.cached(plan)
        progress = Progress()
        # Overlap the hold's round trip with the prompt prefill when billing says the tenant has room:
        # the generation's call is sent now, but not one reply is read before the hold is granted (so a
        # replica failing meanwhile is retried like any failure before the first token).
        early: EarlyStart | None = None
        go = asyncio.Event()
        if self.admitter.may_start_early(principal, plan, hit):
            early = EarlyStart(self.dispatcher.answer(ctx, plan, progress, hit, go))
            # Two turns of the loop: the first runs the generation up to its call, the second sends that
            # call's request, so it leaves before the hold's request is even built.
            await asyncio.sleep(0)
            await asyncio.sleep(0)
        try:
            hold = await self.admitter.hold(ctx, plan, hit, start_wall, early is not None, self.planner.tighten)
        except BaseException:
            if early is not None:
                go.set()  # a generation shared with identical requests goes on for them
                await asyncio.shield(early.aclose())  # refused: this caller's generation stops, nothing was sent
            await self.admitter.withdraw(principal, admission, slot_held=early is not None)
            raise
        go.set()
        progress.admitted = early is not None
        try:
            slot_held = early is not None
            try:
                if not slot_held:
                    await self.admitter.acquire(plan.traffic_class)
                    slot_held = progress.admitted = True
                stream = early if early is not None else self.dispatcher.answer(ctx, plan, progress, hit)
                async for chunk in stream:
                    if chunk.finish_reason != FinishReason.UNSPECIFIED:
                        progress.final = chunk
                    if chunk.delta or chunk.tokens:
                        if progress.first_token_at is None:
                            progress.first_token_at = self._clock()
                        progress.parts.append(chunk.delta)
                        progress.tokens += chunk.tokens
                        yield Chunk(delta=chunk.delta, tokens=chunk.tokens)
            finally:
                if early is not None and not early.finished:
                    await asyncio.shield(early.aclose())
                if slot_held:
                    self.admitter.release()
        except BaseException as exc:
            cancelled = isinstance(exc, asyncio.CancelledError | GeneratorExit)
            status = UsageStatus.CANCELLED if cancelled else UsageStatus.FAILED
            finishing = self.accountant.spawn(self.accountant.finish(ctx, plan, hold, admission, progress, status,
                                                                     started, start_wall, error=exc))
            await asyncio.shield(finishing)
            raise
        yield await self.accountant.finish(ctx, plan, hold, admission, progress, UsageStatus.COMPLETED, started,
                                           start_wall)

    async def complete(self, ctx: RequestContext, req: GenerationRequest) -> tuple[str, Summary]:
        parts: list[str] = []
        summary: Summary | None = None
        async for item in self.generate(ctx, req):
            if isinstance(item, Summary):
                summary = item
            else:
                parts.append(item.delta)
        assert summary is not None
        return "".join(parts), summary

    async def run_task(
        self, ctx: RequestContext, model: str, spec: TaskSpec, sampling: Sampling, traffic: TrafficClass
    ) -> tuple[str, Summary]:
        """A declarative task (summarize, translate, ...) rendered to chat messages; greedy unless asked."""
        messages = await offload.sized(len(spec.content), render_task, spec)
        if sampling.temperature is None:
            sampling = replace(sampling, temperature=0.0)
        request = GenerationRequest(model=model, messages=messages, sampling=sampling, tags=ctx.tags,
                                    traffic_class=traffic)
        return await self.complete(ctx, request)

    async def drain(self) -> None:
        """Wait for background settlements (at shutdown, before the billing channel closes)."""
        await self.accountant.drain()
