"""API key secrets: generation, the visible prefix and the keyed hash (HMAC-SHA256 with a server pepper).

A secret looks like `ag_3F9kq2Lm_<32 random url-safe chars>`; the first 11 characters (`ag_` + 8) are
the visible prefix used to recognise a key in listings. Only HMAC-SHA256(pepper, secret) is stored.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from services.common.generation import TrafficClass
from services.router.types import Principal

SECRET_PREFIX = "ag_"
PREFIX_LENGTH = len(SECRET_PREFIX) + 8
_ALPHABET = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"


def new_secret() -> str:
    visible = "".join(secrets.choice(_ALPHABET) for _ in range(8))
    return f"{SECRET_PREFIX}{visible}_{secrets.token_urlsafe(24)}"


def prefix_of(secret: str) -> str:
    return secret[:PREFIX_LENGTH]


def looks_like_api_key(token: str) -> bool:
    return token.startswith(SECRET_PREFIX) and len(token) > PREFIX_LENGTH + 1


class KeyedHasher:
    """HMAC-SHA256(pepper, secret) as hex, keyed once: each hash copies the keyed state instead of
    keying HMAC anew (on the router's request path, on a busy 2-core machine, 54 -> 39 µs of CPU per
    authenticated call; a few µs either way in a tight loop)."""

    def __init__(self, pepper: bytes) -> None:
        self._keyed = hmac.new(pepper, digestmod=hashlib.sha256)

    def __call__(self, secret: str) -> str:
        mac = self._keyed.copy()
        mac.update(secret.encode())
        return mac.hexdigest()


def load_or_create_secret_file(path: Path, nbytes: int = 32, text: bool = False) -> bytes:
    """Read a server secret from `path`, creating it (mode 0600) with random content on first start."""
    if path.exists():
        return path.read_bytes().strip()
    path.parent.mkdir(parents=True, exist_ok=True)
    value = secrets.token_urlsafe(nbytes).encode() if text else secrets.token_hex(nbytes).encode()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(value)
    return value


@dataclass(frozen=True)
class ApiKeyRecord:
    """An API key as stored: everything but the secret."""

    key_id: str
    prefix: str
    tenant_id: str
    name: str
    allowed_models: tuple[str, ...] = ()
    requests_per_minute: int = 0
    tokens_per_minute: int = 0
    traffic_class: TrafficClass = TrafficClass.INTERACTIVE
    create_time: datetime | None = None
    revoke_time: datetime | None = None
    expire_time: datetime | None = None
    extra: dict[str, str] = field(default_factory=dict)

    def is_valid_at(self, now: datetime) -> bool:
        if self.revoke_time is not None:
            return False
        return self.expire_time is None or now < self.expire_time

    def principal(self) -> Principal:
        return Principal(
            tenant_id=self.tenant_id,
            key_id=self.key_id,
            traffic_class=self.traffic_class,
            allowed_models=self.allowed_models,
            requests_per_minute=self.requests_per_minute,
            tokens_per_minute=self.tokens_per_minute,
        )


@dataclass(frozen=True)
class NewApiKey:
    """What an operator asks for when creating a key."""

    tenant_id: str
    name: str = ""
    allowed_models: tuple[str, ...] = ()
    requests_per_minute: int = 0
    tokens_per_minute: int = 0
    traffic_class: TrafficClass = TrafficClass.INTERACTIVE
    expire_time: datetime | None = None
