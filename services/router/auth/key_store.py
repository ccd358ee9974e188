"""API keys in SQLite, stored only as keyed hashes. Create, look up by secret, list, revoke."""

from __future__ import annotations

import json
import re
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from services.common.errors import InvalidInput, NotFound
from services.router.auth.api_keys import ApiKeyRecord, KeyedHasher, NewApiKey, new_secret, prefix_of
from services.router.sqlite_util import connect
from services.router.types import TrafficClass

_TENANT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS api_keys (
    key_id TEXT PRIMARY KEY,
    secret_hash TEXT NOT NULL UNIQUE,
    prefix TEXT NOT NULL,
    tenant_id TEXT NOT NULL,
    name TEXT NOT NULL,
    allowed_models TEXT NOT NULL,
    requests_per_minute INTEGER NOT NULL,
    tokens_per_minute INTEGER NOT NULL,
    traffic_class INTEGER NOT NULL,
    create_time TEXT NOT NULL,
    revoke_time TEXT,
    expire_time TEXT
);
CREATE INDEX IF NOT EXISTS api_keys_tenant ON api_keys(tenant_id);
"""


def _ts(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value) if value else None


FOUND_TTL_S = 1.0
FOUND_MAX = 10_000


class KeyStore:
    def __init__(self, path: Path, pepper: bytes, clock: Callable[[], datetime] = lambda: datetime.now(UTC)) -> None:
        self._conn = connect(path)
        self._conn.executescript(_SCHEMA)
        self._hash = KeyedHasher(pepper)
        self._clock = clock
        self._lock = threading.Lock()
        # Lookups by secret hash, kept FOUND_TTL_S (this process's revokes clear it at once).
        self._found: dict[str, tuple[float, ApiKeyRecord | None]] = {}

    def close(self) -> None:
        self._conn.close()

    def create(self, spec: NewApiKey) -> tuple[ApiKeyRecord, str]:
        """Store a new key and return it with its secret (the only time the secret exists)."""
        if not _TENANT.match(spec.tenant_id):
            raise InvalidInput(
                "tenant_id must be 1-64 characters of letters, digits, '_', '.' or '-'", field="tenant_id"
            )
        if spec.requests_per_minute < 0 or spec.tokens_per_minute < 0:
            raise InvalidInput("limits must be >= 0 (0 means no limit)", field="limits")
        traffic = spec.traffic_class or TrafficClass.INTERACTIVE
        now = self._clock()
        if spec.expire_time is not None and spec.expire_time <= now:
            raise InvalidInput("expire_time must be in the future", field="expire_time")
        secret = new_secret()
        record = ApiKeyRecord(
            key_id=f"key_{uuid.uuid4().hex[:16]}",
            prefix=prefix_of(secret),
            tenant_id=spec.tenant_id,
            name=spec.name,
            allowed_models=tuple(spec.allowed_models),
            requests_per_minute=spec.requests_per_minute,
            tokens_per_minute=spec.tokens_per_minute,
            traffic_class=TrafficClass(traffic),
            create_time=now,
            expire_time=spec.expire_time,
        )
        with self._lock:
            self._conn.execute(
                "INSERT INTO api_keys VALUES (?,?,?,?,?,?,?,?,?,?,NULL,?)",
                (
                    record.key_id, self._hash(secret), record.prefix, record.tenant_id, record.name,
                    json.dumps(list(record.allowed_models)), record.requests_per_minute, record.tokens_per_minute,
                    int(record.traffic_class), now.isoformat(),
                    record.expire_time.isoformat() if record.expire_time else None,
                ),
            )
        return record, secret

    def find_by_secret(self, secret: str) -> ApiKeyRecord | None:
        """The key whose secret this is (valid or not), or None. Answers come from memory for up to
        FOUND_TTL_S, so a change made to the key file by another process shows within that time."""
        digest = self._hash(secret)
        now = time.monotonic()
        found = self._found.get(digest)
        if found is not None and now - found[0] < FOUND_TTL_S:
            return found[1]
        with self._lock:
            row = self._conn.execute("SELECT * FROM api_keys WHERE secret_hash = ?", (digest,)).fetchone()
        record = self._record(row) if row else None
        if record is not None:  # unknown secrets are not remembered: nobody can fill memory with guesses
            if len(self._found) >= FOUND_MAX:
                self._found.clear()
            self._found[digest] = (now, record)
        return record

    def get(self, key_id: str) -> ApiKeyRecord:
        with self._lock:
            row = self._conn.execute("SELECT * FROM api_keys WHERE key_id = ?", (key_id,)).fetchone()
        if row is None:
            raise NotFound(f"no API key with id {key_id!r}", field="key_id")
        return self._record(row)

    def list(self, tenant_id: str = "", include_revoked: bool = False) -> list[ApiKeyRecord]:
        sql = "SELECT * FROM api_keys WHERE (? = '' OR tenant_id = ?)"
        if not include_revoked:
            sql += " AND revoke_time IS NULL"
        with self._lock:
            rows = self._conn.execute(sql + " ORDER BY create_time, key_id", (tenant_id, tenant_id)).fetchall()
        return [self._record(row) for row in rows]

    def revoke(self, key_id: str) -> ApiKeyRecord:
        """Revoke a key (idempotent: revoking twice keeps the first revoke time)."""
        self._found.clear()
        with self._lock:
            self._conn.execute(
                "UPDATE api_keys SET revoke_time = COALESCE(revoke_time, ?) WHERE key_id = ?",
                (self._clock().isoformat(), key_id),
            )
        return self.get(key_id)

    @staticmethod
    def _record(row: sqlite3.Row) -> ApiKeyRecord:
        return ApiKeyRecord(
            key_id=row["key_id"],
            prefix=row["prefix"],
            tenant_id=row["tenant_id"],
            name=row["name"],
            allowed_models=tuple(json.loads(row["allowed_models"])),
            requests_per_minute=row["requests_per_minute"],
            tokens_per_minute=row["tokens_per_minute"],
            traffic_class=TrafficClass(row["traffic_class"]),
            create_time=_ts(row["create_time"]),
            revoke_time=_ts(row["revoke_time"]),
            expire_time=_ts(row["expire_time"]),
        )
