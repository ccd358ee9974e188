"""Plain data the router's domain modules exchange (no grpc, no protobuf).

Enum values mirror the proto enums of `autoglm.common.v1` so conversions at the edge are `int(...)`.
Chat messages, sampling parameters, traffic classes and finish reasons are the mesh's shared ones
(`services.common.generation`, also what the inference engine takes), usage and its status those of
`services.common.usage`; `Message` is the router's name for a chat message.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum

from services.common.generation import ChatMessage, FinishReason, Role, Sampling, TrafficClass
from services.common.usage import Usage

__all__ = [
    "CachePolicy", "ChatMessage", "Chunk", "GenerationRequest", "Message", "Money", "Principal",
    "RequestContext", "Role", "Sampling", "Summary",
]

Message = ChatMessage


class CachePolicy(IntEnum):
    DEFAULT = 0
    BYPASS = 1
    ALLOW_SAMPLED = 2


@dataclass(frozen=True)
class Money:
    currency_code: str = "USD"
    micros: int = 0


@dataclass(frozen=True)
class Principal:
    """Who is calling: resolved from an API key or a JWT."""

    tenant_id: str
    key_id: str
    traffic_class: TrafficClass = TrafficClass.INTERACTIVE
    allowed_models: tuple[str, ...] = ()
    requests_per_minute: int = 0
    tokens_per_minute: int = 0

    def may_call(self, model: str) -> bool:
        return not self.allowed_models or model in self.allowed_models


@dataclass(frozen=True)
class GenerationRequest:
    """A request as the caller made it (before context replay, policy and routing)."""

    model: str
    prompt: str = ""
    messages: tuple[Message, ...] = ()
    sampling: Sampling = field(default_factory=Sampling)
    context_id: str = ""
    tags: dict[str, str] = field(default_factory=dict)
    traffic_class: TrafficClass = TrafficClass.UNSPECIFIED
    cache_policy: CachePolicy = CachePolicy.DEFAULT
    raw_prompt: bool = False
    coalesce_ms: int = 0
    coalesce_tokens: int = 0


@dataclass(frozen=True)
class Chunk:
    """One piece of a generation stream. The last one carries the finish reason and usage."""

    delta: str = ""
    tokens: int = 0
    finish_reason: FinishReason = FinishReason.UNSPECIFIED
    usage: Usage | None = None
    # Set by the router on the last chunk: which model and version answered.
    model: str = ""
    model_version: str = ""


@dataclass(frozen=True)
class Summary:
    """What a finished request cost and why it ended."""

    finish_reason: FinishReason
    usage: Usage
    cost: Money
    model: str
    model_version: str
    trace_id: str
    time_to_first_token_ms: int


@dataclass(frozen=True)
class RequestContext:
    """Attribution of one request: travels to billing and to the access log."""

    request_id: str
    trace_id: str
    principal: Principal
    tags: dict[str, str] = field(default_factory=dict)
    # When the caller stops waiting (time.monotonic() seconds); None: no deadline.
    deadline: float | None = None
    # The span that serves the request (16 hex characters; empty: none): billing's span of its usage
    # event is its child.
    span_id: str = ""
