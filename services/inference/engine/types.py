"""Plain dataclasses the engine takes and returns; the servicer converts protobuf to and from these.

Chat messages, sampling parameters, traffic classes and finish reasons are the mesh's shared ones
(`services.common.generation`), usage that of `services.common.usage`: the same types the router builds
its requests from and reads its answers into.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from services.common.generation import ChatMessage, FinishReason, Sampling, TrafficClass
from services.common.usage import Usage, UsageStatus


@dataclass(frozen=True)
class StreamSettings:
    """Coalesce deltas: send at most one message per `coalesce_ms` / up to `coalesce_tokens` tokens."""

    coalesce_ms: int = 0
    coalesce_tokens: int = 0


@dataclass(frozen=True)
class Attribution:
    """Who a request is billed to, as the router named it; reported with the finished sequence."""

    api_key_id: str = ""
    model: str = ""
    model_version: str = ""
    tags: tuple[tuple[str, str], ...] = ()
    router_id: str = ""
    trace_id: str = ""


@dataclass(frozen=True)
class GenerationRequest:
    request_id: str = ""
    prompt: str = ""
    messages: tuple[ChatMessage, ...] = ()
    sampling: Sampling = field(default_factory=Sampling)
    traffic_class: TrafficClass = TrafficClass.INTERACTIVE
    stream: StreamSettings = field(default_factory=StreamSettings)
    tenant_id: str = ""  # prefix-cache blocks are shared within one tenant only
    attribution: Attribution = field(default_factory=Attribution)


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
    steps_after_cancel_total: int = 0  # model steps cancelled sequences ran after their cancel arrived
    prefill_tokens_total: int = 0  # prompt tokens computed (not served from the prefix cache)
    prefix_cache_hits: int = 0  # blocks served from the prefix cache
    prefix_cache_misses: int = 0  # cacheable blocks prefilled
    prefix_cache_blocks: int = 0
    prefix_cache_bytes: int = 0
    kv_budget_bytes: int = 0  # what kv_cache_bytes may grow to
    prefix_cache_warm_tokens: int = 0  # answers' tokens prefilled into the prefix cache (idle or while decoding)
    prefix_cache_eager_warm_tokens: int = 0  # of those, prefilled while the answer was being decoded
    slots_taken_over_total: int = 0  # chat turns that took over their conversation's parked slot
    slots_widened_total: int = 0  # parked slots moved, while idle, to a batch wide enough for the next turn


@dataclass(frozen=True)
class FinishedSequence:
    """A sequence that left the engine: what it used, for engine-side metering."""

    request: GenerationRequest
    replica_id: str
    prompt_tokens: int
    completion_tokens: int
    status: UsageStatus  # how it ended, as billing numbers usage statuses
    start_us: int  # wall clock, microseconds since the epoch
    end_us: int
