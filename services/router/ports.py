"""What the router needs from inference and billing, as plain interfaces.

The gRPC adapters (`inference_client.py`, `billing_client.py`) implement them and turn failed calls
into domain errors through the one table in `services/common/peer_errors.py`: `PeerUnreachable` when a
peer cannot be reached (the only failure that counts as "down"; safe to retry elsewhere), `QueueFull`
when a replica's admission queue is full, `BudgetExceeded` when billing refuses a hold, `Internal` for
anything the table does not name.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Protocol

from services.common.generation import TrafficClass
from services.common.pricing import Price
from services.common.usage import AlertLevel, UsageStatus
from services.router.types import Chunk, Message, Money, Sampling

if TYPE_CHECKING:
    from services.router.leasebook import Admitted


@dataclass(frozen=True)
class InferenceCall:
    request_id: str
    prompt: str = ""
    messages: tuple[Message, ...] = ()
    sampling: Sampling = field(default_factory=Sampling)
    traffic_class: TrafficClass = TrafficClass.INTERACTIVE
    coalesce_ms: int = 0
    coalesce_tokens: int = 0
    tenant_id: str = ""
    # Billing attribution, reported by the replica with the finished sequence (engine-side metering).
    api_key_id: str = ""
    model: str = ""
    model_version: str = ""
    tags: dict[str, str] = field(default_factory=dict)
    trace_id: str = ""


@dataclass(frozen=True)
class ModelInfo:
    name: str
    version: str
    context_window: int
    replica_id: str = ""


@dataclass(frozen=True)
class LoadReport:
    replica_id: str
    queue_depth: int
    active_sequences: int
    ready: bool
    # For the operator's view of a replica (the balancer uses the fields above).
    queue_capacity: int = 0
    kv_cache_bytes: int = 0
    kv_budget_bytes: int = 0
    tokens_per_second: float = 0.0


class InferencePort(Protocol):
    def generate(self, address: str, call: InferenceCall, ready: asyncio.Event | None = None) -> AsyncIterator[Chunk]:
        """Stream a generation. With `ready`, the call is sent at once but no reply is read before it is set."""
        ...

    async def count_tokens(self, address: str, prompt: str, messages: tuple[Message, ...]) -> tuple[int, int]:
        """(token count, context window)."""
        ...

    async def model_info(self, address: str) -> ModelInfo: ...


@dataclass(frozen=True)
class UsageRecord:
    """One usage event, exactly as billing receives it."""

    event_id: str
    tenant_id: str
    api_key_id: str
    model: str
    model_version: str
    prompt_tokens: int
    completion_tokens: int
    status: UsageStatus
    traffic_class: TrafficClass
    request_id: str
    trace_id: str
    start_time: datetime
    end_time: datetime
    cached: bool = False
    tags: dict[str, str] = field(default_factory=dict)
    # The price the caller was quoted with (billing charges it while it was in force within its grace).
    quoted_price_id: str = ""
    # The billing leases the request was admitted against (router/leasebook.py).
    lease_ids: tuple[str, ...] = ()
    # The router span that served the request (billing's span of the event is its child).
    span_id: str = ""


@dataclass(frozen=True)
class HoldRequest:
    request_id: str
    tenant_id: str
    api_key_id: str
    model: str
    model_version: str
    traffic_class: TrafficClass
    max_prompt_tokens: int
    max_completion_tokens: int
    tags: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Hold:
    hold_id: str
    level: AlertLevel = AlertLevel.NONE
    offline: bool = False
    # Set when admitted against this router's leases instead of a billing hold (hold_id is then empty).
    admitted: Admitted | None = None


class BillingPort(Protocol):
    async def reserve(self, request: HoldRequest) -> Hold: ...

    async def settle(self, hold_id: str, usage: UsageRecord) -> Money: ...

    async def release(self, hold_id: str) -> None: ...

    async def record(self, usage: UsageRecord) -> Money: ...

    async def check_budget(
        self, tenant_id: str, api_key_id: str, tags: dict[str, str], traffic_class: TrafficClass
    ) -> tuple[bool, AlertLevel]: ...

    async def list_prices(self) -> list[Price]: ...
