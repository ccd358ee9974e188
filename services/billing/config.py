"""Billing settings."""

from __future__ import annotations

from dataclasses import dataclass, field

from services.common.config import ServerSettings

DEFAULT_PORT = 50061


@dataclass(frozen=True)
class BillingConfig:
    server: ServerSettings = field(default_factory=lambda: ServerSettings(port=DEFAULT_PORT))
