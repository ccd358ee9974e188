"""What a request used, how it ended, and a budget's alert level: defined once for the router, the inference
engine and billing.

Plain data (no grpc, no protobuf); `UsageStatus` and `AlertLevel` values equal those of
`autoglm.billing.v1.UsageStatus` and `AlertLevel` (tests/unit/common/test_proto_enums.py pins them; the
proto's ALERT_LEVEL_UNSPECIFIED, below every threshold, is `AlertLevel.NONE`), so a conversion at either
edge is `int(...)`.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum


class UsageStatus(IntEnum):
    UNSPECIFIED = 0
    COMPLETED = 1
    CANCELLED = 2
    FAILED = 3


class AlertLevel(IntEnum):
    NONE = 0
    WARNING = 1
    CRITICAL = 2
    EMERGENCY = 3


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached: bool = False  # answered from the router's response cache

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens
