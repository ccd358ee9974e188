"""Plan: a request checked and resolved before anything is spent on it.

validate (tags, traffic class, prompt or messages) → policy (blocked terms, max_tokens cap) → context
replay (+ trimming to the window) → model → version (canary split) → the prompt's token bound (exact when a
window, a context or a policy needs it) → the cache key. Nothing here holds budget or rate-limit room.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import datetime

from services.common.errors import DomainError, InvalidInput, PermissionDenied
from services.common.generation import TrafficClass
from services.common.usage import Usage, UsageStatus
from services.router import lifecycle, offload
from services.router.balancer import Balancer
from services.router.cache import cache_key
from services.router.contexts import ContextStore, fit_to_window
from services.router.policy import Policy, PolicyStore
from services.router.ports import InferencePort, UsageRecord
from services.router.prompt_tokens import PromptTokens
from services.router.registry import ModelEntry, Registry, VersionEntry, split_model
from services.router.sampling_defaults import apply_defaults
from services.router.types import (
    CachePolicy,
    GenerationRequest,
    Message,
    Principal,
    RequestContext,
    Role,
)

MAX_TAGS = 16
MAX_TAG_LENGTH = 64
# Upper bound of what a chat template adds: per message, and once (e.g. a default system prompt).
TEMPLATE_TOKENS_PER_MESSAGE = 8
TEMPLATE_TOKENS_FIXED = 64


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


def one_of(prompt: str, messages: tuple[Message, ...], raw: bool) -> tuple[str, tuple[Message, ...]]:
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


def usage_record(
    ctx: RequestContext, plan: Plan, model: str, version: str, usage: Usage, status: UsageStatus,
    start: datetime, end: datetime,
) -> UsageRecord:
    """The one usage event of a planned request."""
    principal = ctx.principal
    return UsageRecord(
        event_id=ctx.request_id, tenant_id=principal.tenant_id, api_key_id=principal.key_id, model=model,
        model_version=version, prompt_tokens=usage.prompt_tokens, completion_tokens=usage.completion_tokens,
        status=status, traffic_class=plan.traffic_class, request_id=ctx.request_id, trace_id=ctx.trace_id,
        start_time=start, end_time=end, cached=usage.cached, tags=plan.tags, span_id=ctx.span_id,
    )


class Planner:
    def __init__(self, registry: Registry, balancer: Balancer, inference: InferencePort, contexts: ContextStore,
                 policies: PolicyStore, default_max_tokens: int, prompt_tokens: PromptTokens | None = None) -> None:
        # The prompt's token bound: the version's own tokenizer and chat template, the byte bound without one.
        self.prompt_tokens = prompt_tokens or PromptTokens(prompt_token_bound)
        self._registry = registry
        self._balancer = balancer
        self._inference = inference
        self._contexts = contexts
        self._policies = policies
        self._default_max_tokens = default_max_tokens

    def callable_models(self, principal: Principal) -> list[ModelEntry]:
        return [m for m in self._registry.models() if principal.may_call(m.name)]

    def resolve(self, principal: Principal, spec: str) -> tuple[ModelEntry, VersionEntry]:
        """The model and version (canary split, or pinned with `@`) this principal may call; raises otherwise."""
        name, pinned = split_model(spec)
        if not principal.may_call(name):
            raise PermissionDenied(f"this API key may not call model {name!r}", field="model")
        model = self._registry.get(name)
        return model, self._registry.pick_version(name, pinned)

    def check(self, principal: Principal, spec: str) -> None:
        """Raises unless this principal may call this existing model (and the version it pins serves
        pinned requests); a model with no ACTIVE version passes (its card still shows)."""
        name, pinned = split_model(spec)
        if not principal.may_call(name):
            raise PermissionDenied(f"this API key may not call model {name!r}", field="model")
        model = self._registry.get(name)
        if pinned:
            lifecycle.refuse_unserved(spec, model.version(pinned).state, pinned=True)

    async def count_tokens(
        self, principal: Principal, spec: str, prompt: str, messages: tuple[Message, ...], raw: bool
    ) -> tuple[int, int, str, str]:
        model, version = self.resolve(principal, spec)
        prompt, messages = one_of(prompt, messages, raw)
        count, window = await self.count(version, prompt if raw else "", () if raw else messages)
        return count, window or model.context_window, model.name, version.version

    async def count(self, version: VersionEntry, prompt: str, messages: tuple[Message, ...]) -> tuple[int, int]:
        address = self._balancer.pick(version.replicas)
        return await self._inference.count_tokens(address, prompt, messages)

    async def exact_count(self, model: str, version: VersionEntry, size: int, prompt: str,
                          messages: tuple[Message, ...], raw: bool) -> int:
        """The prompt's exact token count: with the version's own tokenizer and template here when the
        router has them (no round trip), else as a replica counts it."""
        found = await self.prompt_tokens.exact(model, version.version, size, prompt, messages, raw)
        if found is not None:
            return found
        return (await self.count(version, prompt if raw else "", () if raw else messages))[0]

    async def exact_prompt(self, plan: Plan) -> int:
        """The prompt's exact token count (its bound when no replica can say)."""
        try:
            return await self.exact_count(plan.model.name, plan.version, _chars(plan.prompt, plan.messages),
                                          plan.prompt, plan.messages, plan.raw_prompt)
        except DomainError:
            return plan.prompt_bound

    async def tighten(self, plan: Plan) -> int:
        """The plan's prompt bound made exact with the version's own tokenizer where the router has it (no
        round trip; the byte bound stays otherwise), for what admits a request by its worst case: a key's
        tokens/min, and a budget hold its leases cannot cover loosely."""
        if plan.prompt_exact is None:
            size = _chars(plan.prompt, plan.messages)
            found = await self.prompt_tokens.exact(plan.model.name, plan.version.version, size, plan.prompt,
                                                   plan.messages, plan.raw_prompt)
            if found is None:
                return plan.prompt_bound
            plan.prompt_exact = plan.prompt_bound = found
        return plan.prompt_exact

    async def plan(self, ctx: RequestContext, req: GenerationRequest) -> Plan:
        principal = ctx.principal
        model, version = self.resolve(principal, req.model)
        traffic = effective_class(req.traffic_class, principal)
        validate_tags(ctx.tags)
        ContextStore.validate(req.context_id)
        if req.raw_prompt and req.context_id:
            raise InvalidInput("context_id needs chat messages; it cannot be combined with raw_prompt",
                               field="context_id")
        prompt, new_turn = one_of(req.prompt, req.messages, req.raw_prompt)
        sampling = apply_defaults(req.sampling, version.default_sampling)  # the version's, for unset fields
        if sampling.max_tokens is not None and sampling.max_tokens < 1:
            raise InvalidInput("sampling.max_tokens must be >= 1", field="sampling.max_tokens")
        policy = self._policies.for_tenant(principal.tenant_id)
        size = _chars(prompt, new_turn)  # big inputs are matched, bounded and hashed off the event loop
        await offload.sized(size, policy.check_text, prompt, new_turn)
        window = model.context_window
        max_tokens = sampling.max_tokens or self._default_max_tokens
        if window:
            max_tokens = min(max_tokens, window - 1) if sampling.max_tokens is None else max_tokens
        policy.check_max_tokens(max_tokens)
        history = await self._contexts.ahistory(principal.tenant_id, req.context_id) if req.context_id else ()
        messages = history + new_turn
        size += _chars("", history)
        exact: int | None = None
        # The byte bound first: the tokenizer runs only where the bound must be exact (a window, a context,
        # a policy below; a token limit or a budget's edge later, `tighten`).
        bound = await offload.sized(size, self.prompt_tokens.fallback, prompt, messages, req.raw_prompt)
        if req.context_id or policy.max_prompt_tokens or (window and bound + max_tokens > window):
            if req.raw_prompt:
                exact = await self.exact_count(model.name, version, size, prompt, (), True)
            else:
                async def count(candidate: tuple[Message, ...]) -> int:
                    return await self.exact_count(model.name, version, size, "", candidate, False)

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
