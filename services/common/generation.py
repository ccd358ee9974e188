"""Chat messages, sampling parameters, traffic classes and finish reasons, defined once for the router and
the inference engine (billing takes the traffic class too).

Plain data (no grpc, no protobuf); `Role`, `TrafficClass` and `FinishReason` values equal those of
`autoglm.common.v1.ChatRole`, `TrafficClass` and `FinishReason` (tests/unit/common/test_proto_enums.py pins
them), so a conversion at either edge is `int(...)`, and they are what the router persists for stored
conversations and batch jobs. A chat template sees a role by its lower-case name (`template_name`), as
Hugging Face templates expect.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum


class Role(IntEnum):
    UNSPECIFIED = 0
    SYSTEM = 1
    USER = 2
    ASSISTANT = 3

    @property
    def template_name(self) -> str:
        """The role as chat templates name it: "system", "user" or "assistant"."""
        return self.name.lower()


class TrafficClass(IntEnum):
    """How a request is scheduled; a lower value is admitted first (UNSPECIFIED: the key's own class)."""

    UNSPECIFIED = 0
    CORE = 1
    INTERACTIVE = 2
    BATCH = 3


class FinishReason(IntEnum):
    UNSPECIFIED = 0
    STOP = 1
    LENGTH = 2
    CANCELLED = 3
    ERROR = 4


@dataclass(frozen=True)
class ChatMessage:
    role: Role
    content: str


@dataclass(frozen=True)
class Sampling:
    """Sampling parameters as the caller sent them; None = not set (the model's default applies)."""

    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    repetition_penalty: float | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    max_tokens: int | None = None

    @property
    def deterministic(self) -> bool:
        """Greedy decoding (temperature 0 or unset) or a fixed seed gives the same text every time."""
        return self.seed is not None or not self.temperature
