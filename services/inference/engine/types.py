"""Plain dataclasses the engine takes and returns; the servicer converts protobuf to and from these."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class TrafficClass(enum.IntEnum):
    """Admission priority: a lower value is admitted first."""

    CORE = 0
    INTERACTIVE = 1
    BATCH = 2


class FinishReason(enum.Enum):
    STOP = "stop"
    LENGTH = "length"
    CANCELLED = "cancelled"
    ERROR = "error"


class Role(enum.Enum):
    SYSTEM = "system"
    USER = "user"
    ASSISTANT = "assistant"


@dataclass(frozen=True)
class ChatMessage:
    role: Role
    content: str


@dataclass(frozen=True)
class SamplingRequest:
    """Sampling settings as the caller sent them; None = not set (the model's default applies)."""

    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    repetition_penalty: float | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    max_tokens: int | None = None


@dataclass(frozen=True)
class StreamSettings:
    """Coalesce deltas: send at most one message per `coalesce_ms` / up to `coalesce_tokens` tokens."""

    coalesce_ms: int = 0
    coalesce_tokens: int = 0


@dataclass(frozen=True)
class GenerationRequest:
    request_id: str = ""
    prompt: str = ""
    messages: tuple[ChatMessage, ...] = ()
    sampling: SamplingRequest = field(default_factory=SamplingRequest)
    traffic_class: TrafficClass = TrafficClass.INTERACTIVE
    stream: StreamSettings = field(default_factory=StreamSettings)


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True)
class Delta:
    """One piece of a stream: new text, the token ids behind it; the last one has finish + usage."""

    text: str
    token_ids: tuple[int, ...] = ()
    finish_reason: FinishReason | None = None
    usage: Usage | None = None


@dataclass(frozen=True)
class ModelInfo:
    name: str
    version: str
    context_window: int
    vocab_size: int
    precision: str
    execution_provider: str
    manifest_sha256: str
    max_batch_size: int
    replica_id: str


@dataclass(frozen=True)
class LoadReport:
    replica_id: str
    queue_depth: int
    queue_capacity: int
    active_sequences: int
    max_batch_size: int
    kv_cache_tokens: int
    kv_cache_bytes: int
    tokens_per_second: float
    cancelled_total: int
    generated_total: int
    ready: bool
