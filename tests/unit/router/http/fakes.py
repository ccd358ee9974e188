"""A fake gateway (its methods checked against the real Gateway's signatures) and a fake authenticator,
for route tests of the HTTP transport without a model."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from services.common.errors import DomainError, Unauthenticated
from services.common.generation import FinishReason
from services.common.usage import Usage
from services.router.gateway import Gateway
from services.router.input_limits import InputLimits
from services.router.lifecycle import Deprecation
from services.router.registry import ModelEntry, VersionEntry
from services.router.types import (
    Chunk,
    GenerationRequest,
    Message,
    Money,
    Principal,
    RequestContext,
    Sampling,
    Summary,
)

KEY = "agk_test_secret"
PRINCIPAL = Principal(tenant_id="acme", key_id="k1")
MODEL = ModelEntry("tiny", (VersionEntry("v1", ("127.0.0.1:1",), 1000, True,
                                        default_sampling=Sampling(temperature=0.2, top_p=0.9)),),
                   context_window=2048)


class FakeAuthenticator:
    async def aauthenticate(self, authorization: str) -> Principal:
        return self.authenticate(authorization)

    def authenticate(self, authorization: str) -> Principal:
        if authorization != f"Bearer {KEY}":
            raise Unauthenticated("unknown API key")
        return PRINCIPAL


class FakeRegistry:
    def models(self) -> list[ModelEntry]:
        return [MODEL]

    def get(self, name: str) -> ModelEntry:
        return MODEL


@dataclass
class FakeGateway:
    """Streams `words` one chunk each, then a Summary; raises `error` instead when set (after `fail_after`
    chunks when that is set). Records each call and whether each stream's `finally` ran."""

    words: tuple[str, ...] = ("Hello", " world")
    error: BaseException | None = None
    fail_after: int | None = None
    hold: asyncio.Event | None = None  # when set, the stream waits on it after its first chunk
    calls: list[tuple[RequestContext, GenerationRequest]] = field(default_factory=list)
    closed: list[str] = field(default_factory=list)
    delivered: dict[str, int] = field(default_factory=dict)
    registry: FakeRegistry = field(default_factory=FakeRegistry)
    token_sent: asyncio.Event = field(default_factory=asyncio.Event)
    stream_closed: asyncio.Event = field(default_factory=asyncio.Event)
    deprecated: Deprecation | None = None  # what deprecation() says of a pinned spec

    def deprecation(self, spec: str) -> Deprecation | None:
        return self.deprecated if "@" in spec else None

    def callable_models(self, principal: Principal) -> list[ModelEntry]:
        return [MODEL]

    def check_model(self, principal: Principal, spec: str) -> None:
        if spec.partition("@")[0] != MODEL.name:
            from services.common.errors import NotFound

            raise NotFound(f"unknown model {spec!r}", field="model")

    async def generate(self, ctx: RequestContext, req: GenerationRequest) -> AsyncIterator[Chunk | Summary]:
        self.calls.append((ctx, req))
        sent = 0
        try:
            if self.error is not None and self.fail_after is None:
                raise self.error
            for word in self.words:
                if self.fail_after is not None and sent == self.fail_after:
                    assert self.error is not None
                    raise self.error
                yield Chunk(delta=word, tokens=1)
                sent += 1
                self.delivered[ctx.request_id] = sent
                self.token_sent.set()
                if self.hold is not None:
                    await self.hold.wait()
            prompt = len(req.prompt or "".join(m.content for m in req.messages))
            yield Summary(FinishReason.STOP, Usage(prompt, sent), Money("USD", 10 * sent), MODEL.name, "v1",
                          ctx.trace_id, 1)
        finally:
            self.closed.append(ctx.request_id)
            self.stream_closed.set()

    async def complete(self, ctx: RequestContext, req: GenerationRequest) -> tuple[str, Summary]:
        parts, summary = [], None
        async for item in self.generate(ctx, req):
            if isinstance(item, Summary):
                summary = item
            else:
                parts.append(item.delta)
        assert summary is not None
        return "".join(parts), summary

    async def count_tokens(self, principal: Principal, spec: str, prompt: str, messages: tuple[Message, ...],
                           raw: bool) -> tuple[int, int, str, str]:
        raise NotImplementedError


def check_fake_matches_gateway() -> None:
    for name in ("generate", "complete", "callable_models", "check_model", "count_tokens", "deprecation"):
        real, fake = inspect.signature(getattr(Gateway, name)), inspect.signature(getattr(FakeGateway, name))
        assert list(real.parameters) == list(fake.parameters), name


class FakeBackend:
    def __init__(self, gateway: FakeGateway, input_limits: InputLimits | None = None) -> None:
        self.gateway = gateway
        self.authenticator = FakeAuthenticator()
        self.input_limits = input_limits or InputLimits()

    def healthy_replicas(self, model: ModelEntry) -> dict[str, int]:
        return {v.version: len(v.replicas) for v in model.versions}

    def store_available(self) -> bool:
        return True


__all__ = ["KEY", "DomainError", "FakeBackend", "FakeGateway", "check_fake_matches_gateway"]
