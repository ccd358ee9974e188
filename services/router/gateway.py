"""The request path of the router, from an authenticated caller to a finished, billed answer.

  (size limits, checked by the servicer first) → validate → policy → context replay (+ trimming)
  → pick version → room in the wait queue → rate limit (prompt + max_tokens) → budget hold → priority admission → cache / single-flight / generation with retries and fallbacks
  → one usage event (completed, cancelled with the tokens delivered, or failed) → access log line.

Retries happen only before the first token reached the caller, so nobody ever sees duplicated text.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

import structlog

from services.common.errors import DomainError, Internal, InvalidInput, PermissionDenied, QueueFull, Unavailable
from services.router import metrics, offload
from services.router.admission import PriorityGate
from services.router.balancer import Balancer
from services.router.cache import CachedAnswer, ResponseCache, cache_key
from services.router.canary import CanaryMonitor
from services.router.contexts import ContextStore, fit_to_window
from services.router.limits.token_bucket import Admission, RateLimiter
from services.router.metering import Meter
from services.router.policy import Policy, PolicyStore
from services.router.ports import Hold, HoldRequest, InferenceCall, InferencePort, UsageRecord
from services.router.registry import ModelEntry, Registry, VersionEntry, split_model
from services.router.retry import RetryBudget, RetrySettings, backoff_delay
from services.router.single_flight import SingleFlight
from services.router.types import (
    CachePolicy,
    Chunk,
    FinishReason,
    GenerationRequest,
    Message,
    Money,
    Principal,
    RequestContext,
    Role,
    Summary,
    TrafficClass,
    Usage,
    UsageStatus,
)

log = structlog.get_logger("router.access")
NO_HOLD = Hold(hold_id="")
MAX_TAGS = 16
MAX_TAG_LENGTH = 64
# Upper bound of what a chat template adds: per message, and once (e.g. a default system prompt).
TEMPLATE_TOKENS_PER_MESSAGE = 8
TEMPLATE_TOKENS_FIXED = 64


@dataclass(frozen=True)
class GatewaySettings:
    default_max_tokens: int = 256
    retry: RetrySettings = field(default_factory=RetrySettings)
    hold_ttl_s: int = 300


@dataclass
class Plan:
    """A validated request, resolved to a model version, ready to run."""

    model: ModelEntry
    version: VersionEntry
    policy: Policy
    traffic_class: TrafficClass
    prompt: str
    messages: tuple[Message, ...]
    raw_prompt: bool
    max_tokens: int
    sampling_max: object
    prompt_bound: int
    prompt_exact: int | None
    cache_key: str | None
    context_id: str
    new_turn: tuple[Message, ...]
    tags: dict[str, str]
    request: GenerationRequest
    tenant_id: str = ""  # the replica's prefix cache shares prompt blocks within one tenant only


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


def prompt_token_bound(prompt: str, messages: tuple[Message, ...], raw: bool) -> int:
    """An upper bound of the prompt's tokens without a tokenizer: byte-level BPE never makes more tokens
    than UTF-8 bytes, plus what the chat template may add."""
    if raw:
        return len(prompt.encode()) + 2
    return sum(len(m.content.encode()) + TEMPLATE_TOKENS_PER_MESSAGE for m in messages) + TEMPLATE_TOKENS_FIXED


def _chars(prompt: str, messages: tuple[Message, ...]) -> int:
    return len(prompt) + sum(len(m.content) for m in messages)


def validate_tags(tags: dict[str, str]) -> None:
    if len(tags) > MAX_TAGS:
        raise InvalidInput(f"at most {MAX_TAGS} tags", field="tags")
    for key, value in tags.items():
        if not key or len(key) > MAX_TAG_LENGTH or len(value) > MAX_TAG_LENGTH:
            raise InvalidInput(f"tag keys must be 1-{MAX_TAG_LENGTH} and values at most {MAX_TAG_LENGTH} characters",
                               field="tags")


def effective_class(requested: TrafficClass, principal: Principal) -> TrafficClass:
    allowed = principal.traffic_class or TrafficClass.INTERACTIVE
    if requested == TrafficClass.UNSPECIFIED:
        return allowed
    if requested < allowed:
        raise PermissionDenied(
            f"traffic_class {requested.name} is above this key's class {allowed.name}", field="traffic_class"
        )
    return requested


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
    ) -> None:
        self.registry = registry
        self.balancer = balancer
        self.inference = inference
        self.meter = meter
        self.limiter = limiter
        self.cache = cache
        self.flights: SingleFlight[Chunk] = SingleFlight()
        self.contexts = contexts
        self.policies = policies
        self.canary = canary
        self.gate = gate
        self.settings = settings or GatewaySettings()
        self._clock = clock
        self._wallclock = wallclock
        self._rng = rng or random.Random()
        self._retry_budget = RetryBudget(self.settings.retry, clock)
        self._background: set[asyncio.Task[object]] = set()

    # --- simple reads ----------------------------------------------------------------------------
    def callable_models(self, principal: Principal) -> list[ModelEntry]:
        return [m for m in self.registry.models() if principal.may_call(m.name)]

    def check_model(self, principal: Principal, spec: str) -> None:
        """Raises unless this principal may call this (existing) model."""
        self._resolve(principal, spec)

    def _resolve(self, principal: Principal, spec: str) -> tuple[ModelEntry, VersionEntry]:
        name, pinned = split_model(spec)
        if not principal.may_call(name):
            raise PermissionDenied(f"this API key may not call model {name!r}", field="model")
        model = self.registry.get(name)
        return model, self.registry.pick_version(name, pinned)

    async def count_tokens(
        self, principal: Principal, spec: str, prompt: str, messages: tuple[Message, ...], raw: bool
    ) -> tuple[int, int, str, str]:
        model, version = self._resolve(principal, spec)
        prompt, messages = _one_of(prompt, messages, raw)
        count, window = await self._count(version, prompt if raw else "", () if raw else messages)
        return count, window or model.context_window, model.name, version.version

    async def _count(self, version: VersionEntry, prompt: str, messages: tuple[Message, ...]) -> tuple[int, int]:
        address = self.balancer.pick(version.replicas)
        return await self.inference.count_tokens(address, prompt, messages)

    # --- planning ----------------------------------------------------------------------------------
    async def plan(self, ctx: RequestContext, req: GenerationRequest) -> Plan:
        principal = ctx.principal
        model, version = self._resolve(principal, req.model)
        traffic = effective_class(req.traffic_class, principal)
        validate_tags(ctx.tags)
        ContextStore.validate(req.context_id)
        if req.raw_prompt and req.context_id:
            raise InvalidInput("context_id needs chat messages; it cannot be combined with raw_prompt",
                               field="context_id")
        prompt, new_turn = _one_of(req.prompt, req.messages, req.raw_prompt)
        sampling = req.sampling
        if sampling.max_tokens is not None and sampling.max_tokens < 1:
            raise InvalidInput("sampling.max_tokens must be >= 1", field="sampling.max_tokens")
        policy = self.policies.for_tenant(principal.tenant_id)
        size = _chars(prompt, new_turn)  # big inputs are matched, bounded and hashed off the event loop
        await offload.sized(size, policy.check_text, prompt, new_turn)
        window = model.context_window
        max_tokens = sampling.max_tokens or self.settings.default_max_tokens
        if window:
            max_tokens = min(max_tokens, window - 1) if sampling.max_tokens is None else max_tokens
        policy.check_max_tokens(max_tokens)
        history = self.contexts.history(principal.tenant_id, req.context_id) if req.context_id else ()
        messages = history + new_turn
        size += _chars("", history)
        exact: int | None = None
        bound = await offload.sized(size, prompt_token_bound, prompt, messages, req.raw_prompt)
        if req.context_id or policy.max_prompt_tokens or (window and bound + max_tokens > window):
            if req.raw_prompt:
                exact, _ = await self._count(version, prompt, ())
            else:
                async def count(candidate: tuple[Message, ...]) -> int:
                    return (await self._count(version, "", candidate))[0]

                if req.context_id:
                    messages, exact = await fit_to_window(history, new_turn, max_tokens, window, count)
                else:
                    exact = await count(messages)
            policy.check_prompt_tokens(exact)
            if window and exact + max_tokens > window:
                if sampling.max_tokens is not None:
                    raise InvalidInput(
                        f"the prompt ({exact} tokens) plus max_tokens ({max_tokens}) exceeds the context window"
                        f" of {model.name} ({window} tokens)", field="sampling.max_tokens",
                        reason="CONTEXT_LENGTH_EXCEEDED")
                max_tokens = window - exact
                if max_tokens < 1:
                    raise InvalidInput(f"the prompt ({exact} tokens) fills the context window of {model.name}",
                                       field="prompt", reason="CONTEXT_LENGTH_EXCEEDED")
            bound = exact
        resolved = replace(sampling, max_tokens=max_tokens)
        key = None
        if req.cache_policy != CachePolicy.BYPASS and (
            resolved.deterministic or req.cache_policy == CachePolicy.ALLOW_SAMPLED
        ):
            scope = None if policy.shares_cache_of(model.name) else principal.tenant_id
            key = await offload.sized(size, cache_key, model.name, version.version, resolved, prompt, messages,
                                      req.raw_prompt, policy.normalize_cache_keys, scope=scope)
        return Plan(model, version, policy, traffic, prompt, messages, req.raw_prompt, max_tokens, resolved, bound,
                    exact, key, req.context_id, new_turn, dict(ctx.tags), req, principal.tenant_id)

    # --- the request path --------------------------------------------------------------------------
    async def generate(self, ctx: RequestContext, req: GenerationRequest) -> AsyncIterator[Chunk | Summary]:
        started, start_wall = self._clock(), self._wallclock()
        plan = await self.plan(ctx, req)
        principal = ctx.principal
        self.gate.check_room(plan.traffic_class)  # a full wait queue refuses before limits and holds are spent
        admission = await self.limiter.admit(
            principal.key_id, principal.requests_per_minute, principal.tokens_per_minute,
            plan.prompt_bound + plan.max_tokens,
        )
        hit = self.cache.get(plan.cache_key) if plan.cache_key is not None else None
        progress = Progress()
        # Overlap the hold's round trip with the prompt prefill when billing says the tenant has room:
        # the generation's call is sent now, but not one reply is read before the hold is granted (so a
        # replica failing meanwhile is retried like any failure before the first token).
        early: _EarlyStart | None = None
        go = asyncio.Event()
        if (hit is None and self.meter.may_start_before_hold(principal.tenant_id, plan.traffic_class)
                and self.gate.try_acquire()):
            early = _EarlyStart(self._answer(ctx, plan, progress, hit, go))
            # Two turns of the loop: the first runs the generation up to its call, the second sends that
            # call's request, so it leaves before the hold's request is even built.
            await asyncio.sleep(0)
            await asyncio.sleep(0)
        try:
            if hit is not None and self.meter.may_skip_hold(principal.tenant_id) and self.meter.local_cost(
                    _usage_record(ctx, plan, hit.model, hit.model_version, Usage(hit.prompt_tokens,
                                  hit.completion_tokens, cached=True), UsageStatus.COMPLETED, start_wall,
                                  start_wall)) is not None:
                hold = NO_HOLD  # a cache hit priced locally: its usage is recorded without a hold
            else:
                reserve = self.meter.reserve_early if early is not None else self.meter.reserve
                hold = await reserve(HoldRequest(
                    request_id=ctx.request_id, tenant_id=principal.tenant_id, api_key_id=principal.key_id,
                    model=plan.model.name, model_version=plan.version.version, traffic_class=plan.traffic_class,
                    max_prompt_tokens=plan.prompt_bound, max_completion_tokens=plan.max_tokens, tags=plan.tags,
                ), deadline=ctx.deadline)
        except BaseException:
            if early is not None:
                go.set()  # a generation shared with identical requests goes on for them
                await asyncio.shield(early.aclose())  # refused: this caller's generation stops, nothing was sent
                self.gate.release()
            await self.limiter.settle(admission, principal.tokens_per_minute, 0)
            raise
        go.set()
        progress.admitted = early is not None
        try:
            slot_held = early is not None
            try:
                if not slot_held:
                    await self.gate.acquire(plan.traffic_class)
                    slot_held = progress.admitted = True
                stream = early if early is not None else self._answer(ctx, plan, progress, hit)
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
                    self.gate.release()
        except BaseException as exc:
            cancelled = isinstance(exc, asyncio.CancelledError | GeneratorExit)
            status = UsageStatus.CANCELLED if cancelled else UsageStatus.FAILED
            finishing = self._spawn(self._finish(ctx, plan, hold, admission, progress, status, started, start_wall,
                                                 error=exc))
            await asyncio.shield(finishing)
            raise
        yield await self._finish(ctx, plan, hold, admission, progress, UsageStatus.COMPLETED, started, start_wall)

    def _answer(
        self, ctx: RequestContext, plan: Plan, progress: Progress, hit: CachedAnswer | None,
        go: asyncio.Event | None = None,
    ) -> AsyncIterator[Chunk]:
        key = plan.cache_key
        if key is None:
            return self._generation(ctx.request_id, plan, go)
        if hit is None and not self.flights.in_flight(key):
            hit = self.cache.get(key)  # an identical request may have finished while this one waited for its hold
        if hit is not None:
            progress.cached = True
            return _replay(hit)

        def remember(chunks: list[Chunk]) -> None:
            if (answer := _answer_of(chunks)) is not None:
                self.cache.put(key, answer)

        stream, leader = self.flights.join(key, lambda: self._generation(ctx.request_id, plan, go), remember)
        progress.cached = not leader
        return stream

    def _candidates(self, plan: Plan) -> list[tuple[ModelEntry, VersionEntry]]:
        candidates = [(plan.model, plan.version)]
        stable = plan.model.stable
        if stable.version != plan.version.version and not plan.request.model.count("@"):
            candidates.append((plan.model, stable))  # a failing canary falls back to the stable version
        for name in plan.model.fallback_models:
            if name in self.registry and name != plan.model.name:
                candidates.append((self.registry.get(name), self.registry.pick_version(name)))
        return candidates

    async def _generation(self, request_id: str, plan: Plan, go: asyncio.Event | None = None) -> AsyncIterator[Chunk]:
        """One generation with retries (before the first token only) across replicas and fallback models."""
        self._retry_budget.on_request()
        settings = self.settings.retry
        last: DomainError = Unavailable("no inference replica could serve the request")
        attempt = 0
        candidates = self._candidates(plan)
        for index, (model, version) in enumerate(candidates):
            call = InferenceCall(
                request_id=request_id, prompt=plan.prompt if plan.raw_prompt else "",
                messages=() if plan.raw_prompt else plan.messages, sampling=plan.sampling_max,  # type: ignore[arg-type]
                traffic_class=plan.traffic_class, coalesce_ms=plan.request.coalesce_ms,
                coalesce_tokens=plan.request.coalesce_tokens, tenant_id=plan.tenant_id,
            )
            tried: set[str] = set()
            for _ in range(settings.max_attempts):
                try:
                    address = self.balancer.pick(version.replicas, frozenset(tried))
                except Unavailable as exc:
                    if not tried:  # a version with no healthy replica counts as failing
                        self.canary.record(model.name, version.version, False, 0.0)
                    if not isinstance(last, QueueFull | Internal):  # each says more than "no replica left"
                        last = exc
                    break
                tried.add(address)
                started = self._clock()
                delivered = 0
                try:
                    with self.balancer.track(address):
                        async for chunk in self.inference.generate(address, call, go):
                            if chunk.finish_reason != FinishReason.UNSPECIFIED:
                                chunk = replace(chunk, model=model.name, model_version=version.version)
                            delivered += chunk.tokens
                            yield chunk
                    self.canary.record(model.name, version.version, True, self._clock() - started)
                    return
                except (Unavailable, QueueFull) as exc:
                    self.canary.record(model.name, version.version, False, self._clock() - started)
                    if delivered:
                        raise Unavailable(
                            f"the replica serving this stream failed after {delivered} tokens; the tokens received"
                            " are billed, retry the request"
                        ) from exc
                    last = exc
                    if isinstance(exc, Unavailable):  # a full queue is overload, not ill health
                        self.balancer.health_check(address, ok=False)
                    attempt += 1
                    if not self._retry_budget.try_spend():
                        raise last from None
                    await asyncio.sleep(backoff_delay(attempt, settings, self._rng))
                except Internal as exc:
                    # The replica answered with a fault of its own, not a transport failure: another replica of
                    # this version would likely fail the same way, so it is not retried there. It counts against
                    # the version, and before the first token the request moves on to the next candidate (a
                    # canary falls back to stable) as the retry budget allows.
                    self.canary.record(model.name, version.version, False, self._clock() - started)
                    if delivered or index == len(candidates) - 1 or not self._retry_budget.try_spend():
                        raise
                    last = exc
                    break
        raise last

    async def _finish(
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
        record = _usage_record(ctx, plan, answered_model, answered_version, usage, status, start_wall,
                               self._wallclock())
        await self.limiter.settle(admission, principal.tokens_per_minute, usage.total_tokens)
        ttft = int(((progress.first_token_at or self._clock()) - started) * 1000)
        latency_ms = int((self._clock() - started) * 1000)
        local = None if hold.offline else self.meter.local_cost(record)
        if local is not None:
            # The cost is known now: answer at once, settle (and log) right after the last message. The
            # event is journaled first, so a router that dies before settling replays it at its next start.
            self.meter.note_answered(record)
            self._spawn(self._settle(hold, record, local, ttft, latency_ms, error, journaled=True))
        else:
            local = await self._settle(hold, record, None, ttft, latency_ms, error)
        if status == UsageStatus.COMPLETED:
            if plan.context_id:
                self.contexts.append(principal.tenant_id, plan.context_id,
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
            cost = await self.meter.settle(hold, record)
        except DomainError as exc:
            log.error("usage_settle_failed", reason=exc.reason, message=exc.message, event_id=record.event_id)
        if journaled:  # billing or the spool has it now (or billing refused it for good: logged above)
            self.meter.note_settled(record)
        if cost is None:
            cost = expected
        elif expected is not None and cost != expected:
            log.warning("price_book_stale", event_id=record.event_id, expected_micros=expected.micros,
                        billed_micros=cost.micros)
            self._spawn(self.meter.refresh_prices())
        elif expected is None:
            self._spawn(self.meter.refresh_prices(min_interval_s=1.0))  # priced in billing, unknown here
        cost = cost or Money()
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

    async def drain(self) -> None:
        """Wait for background settlements (at shutdown, before the billing channel closes)."""
        while self._background:
            await asyncio.gather(*list(self._background), return_exceptions=True)

    async def _exact_prompt(self, plan: Plan) -> int:
        try:
            count, _ = await self._count(plan.version, plan.prompt if plan.raw_prompt else "",
                                         () if plan.raw_prompt else plan.messages)
            return count
        except DomainError:
            return plan.prompt_bound

    def _spawn(self, coro: Coroutine[Any, Any, object]) -> asyncio.Task[object]:
        task: asyncio.Task[object] = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

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


def _answer_of(chunks: list[Chunk]) -> CachedAnswer | None:
    """What the cache keeps of a generation that ended well (None when it did not)."""
    final = chunks[-1] if chunks else None
    if final is None or final.usage is None or final.finish_reason in (FinishReason.UNSPECIFIED, FinishReason.ERROR,
                                                                       FinishReason.CANCELLED):
        return None
    return CachedAnswer("".join(c.delta for c in chunks), final.finish_reason, final.usage.prompt_tokens,
                        final.usage.completion_tokens, final.model, final.model_version)


class _EarlyStart:
    """A chunk stream pulled from at once, so its generation's call goes out now (its first reply is read
    only once the gateway's `go` event is set)."""

    def __init__(self, source: AsyncIterator[Chunk]) -> None:
        self._source = source
        self._first: asyncio.Task[Chunk] | None = asyncio.ensure_future(self._pull())
        self._closed = False
        self.finished = False  # the source ran to its end: nothing is left to close

    async def _pull(self) -> Chunk:
        return await anext(self._source)

    def __aiter__(self) -> _EarlyStart:
        return self

    async def __anext__(self) -> Chunk:
        try:
            if self._first is not None:
                first, self._first = self._first, None
                return await first
            return await anext(self._source)
        except StopAsyncIteration:
            self.finished = True
            raise

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._first is not None:
            first, self._first = self._first, None
            first.cancel()
            await asyncio.wait([first])
            if not first.cancelled():
                first.exception()  # retrieved: a failure nobody will read is not an error to report
        aclose = getattr(self._source, "aclose", None)
        if aclose is not None:
            await aclose()


def _usage_record(
    ctx: RequestContext, plan: Plan, model: str, version: str, usage: Usage, status: UsageStatus,
    start: datetime, end: datetime,
) -> UsageRecord:
    principal = ctx.principal
    return UsageRecord(
        event_id=ctx.request_id, tenant_id=principal.tenant_id, api_key_id=principal.key_id, model=model,
        model_version=version, prompt_tokens=usage.prompt_tokens, completion_tokens=usage.completion_tokens,
        status=status, traffic_class=plan.traffic_class, request_id=ctx.request_id, trace_id=ctx.trace_id,
        start_time=start, end_time=end, cached=usage.cached, tags=plan.tags,
    )


async def _replay(answer: CachedAnswer) -> AsyncIterator[Chunk]:
    yield Chunk(delta=answer.text, tokens=answer.completion_tokens)
    yield Chunk(finish_reason=answer.finish_reason,
                usage=Usage(answer.prompt_tokens, answer.completion_tokens, cached=True),
                model=answer.model, model_version=answer.model_version)


def _one_of(prompt: str, messages: tuple[Message, ...], raw: bool) -> tuple[str, tuple[Message, ...]]:
    """Exactly one of prompt and messages; a chat prompt becomes one user message."""
    if bool(prompt) == bool(messages):
        raise InvalidInput("set exactly one of prompt and messages", field="prompt")
    if raw and messages:
        raise InvalidInput("raw_prompt applies to prompt only, not messages", field="raw_prompt")
    for index, message in enumerate(messages):
        if message.role == Role.UNSPECIFIED:
            raise InvalidInput("every message needs a role (SYSTEM, USER or ASSISTANT)", field=f"messages[{index}].role")
    if prompt and not raw:
        return prompt, (Message(Role.USER, prompt),)
    return prompt, messages
