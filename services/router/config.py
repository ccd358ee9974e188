"""Router settings."""

from __future__ import annotations

from dataclasses import dataclass, field

from services.common.config import ServerSettings

DEFAULT_PORT = 50051


@dataclass(frozen=True)
class RouterConfig:
    server: ServerSettings = field(default_factory=lambda: ServerSettings(port=DEFAULT_PORT))
    # host:port of each inference replica (or of its sidecar's outbound listener).
    inference_targets: tuple[str, ...] = ()
    # host:port of billing (or of the sidecar's outbound listener).
    billing_target: str = ""
