"""Inference settings."""

from __future__ import annotations

from dataclasses import dataclass, field

from services.common.config import ServerSettings

DEFAULT_PORT = 50071


@dataclass(frozen=True)
class InferenceConfig:
    server: ServerSettings = field(default_factory=lambda: ServerSettings(port=DEFAULT_PORT))
    replica_id: str = "inference-0"
