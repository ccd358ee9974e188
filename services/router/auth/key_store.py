"""API keys, stored only as keyed hashes: create, look up by secret, list, revoke.

Every key is held in memory, so an API-key request is answered without touching the database. The store
(SQLite or PostgreSQL, services/router/store) is followed for changes made by other routers: a key
created or revoked elsewhere is seen here within the store's `poll_s` (at once on PostgreSQL, which
notifies). A secret not in memory is looked up once in the database (it may have been created on another
router a moment ago); unknown secrets are not remembered, so nobody can fill memory with guesses. While
the database cannot be reached, keys in memory keep working and no other secret is looked up. Callers on
the event loop use the `a`-prefixed twins, which run their transaction on a worker thread.
"""

from __future__ import annotations

import builtins
import json
import re
import threading
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from services.common.errors import InvalidInput, NotFound, Unavailable
from services.common.generation import TrafficClass
from services.router.auth.api_keys import ApiKeyRecord, KeyedHasher, NewApiKey, new_secret, prefix_of
from services.router.store import Row, Store, Tx, open_store
from services.router.store.migrations import KEYS

_TENANT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
PEPPER_CHECK = "autoglm-router-key-pepper-check"
_COLUMNS = ("key_id, secret_hash, prefix, tenant_id, name, allowed_models, requests_per_minute, tokens_per_minute,"
            " traffic_class, create_time, revoke_time, expire_time, version")


def _ts(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value) if value else None


class KeyStore:
    def __init__(self, store: Store | Path, pepper: bytes,
                 clock: Callable[[], datetime] = lambda: datetime.now(UTC)) -> None:
        self._store = open_store(f"sqlite:///{store}") if isinstance(store, Path) else store
        self._store.migrate("keys", KEYS)
        self._hash = KeyedHasher(pepper)
        self._check_pepper()
        self._clock = clock
        self._lock = threading.Lock()
        self._by_hash: dict[str, ApiKeyRecord] = {}
        self._by_id: dict[str, tuple[int, str]] = {}  # key_id -> (version, secret hash)

        def load(tx: Tx) -> tuple[int, list[Row]]:
            counter = tx.one("SELECT version FROM router_changes WHERE domain = 'keys'")
            return int(counter["version"]) if counter else 0, tx.all(f"SELECT {_COLUMNS} FROM api_keys")

        since, rows = self._store.read(load)
        self._apply(rows)
        self._store.watch("keys", "api_keys", since, self._apply)

    def close(self) -> None:
        self._store.close()

    def _check_pepper(self) -> None:
        """Refuse a pepper other than the one the stored keys were hashed with: none of them would match."""
        fingerprint = self._hash(PEPPER_CHECK)

        def unit(tx: Tx) -> str:
            tx.execute("INSERT INTO key_pepper (id, fingerprint) VALUES (1, ?) ON CONFLICT (id) DO NOTHING",
                       (fingerprint,))
            row = tx.one("SELECT fingerprint FROM key_pepper WHERE id = 1")
            return str(row["fingerprint"]) if row else fingerprint

        if self._store.write(unit) != fingerprint:
            raise RuntimeError("the API keys in this router's database were hashed with another key pepper: give "
                               "every router on one database the same pepper (router.key_pepper_path)")

    def create(self, spec: NewApiKey) -> tuple[ApiKeyRecord, str]:
        """Store a new key and return it with its secret (the only time the secret exists)."""
        record, secret, digest, insert = self._new(spec)
        self._remember(self._store.write(insert), digest, record)
        return record, secret

    async def acreate(self, spec: NewApiKey) -> tuple[ApiKeyRecord, str]:
        """`create`, written on a worker thread."""
        record, secret, digest, insert = self._new(spec)
        self._remember(await self._store.awrite(insert), digest, record)
        return record, secret

    def _new(self, spec: NewApiKey) -> tuple[ApiKeyRecord, str, str, Callable[[Tx], int]]:
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
        digest = self._hash(secret)

        def insert(tx: Tx) -> int:
            version = tx.bump("keys")
            tx.execute(
                f"INSERT INTO api_keys ({_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?,NULL,?,?)",
                (
                    record.key_id, digest, record.prefix, record.tenant_id, record.name,
                    json.dumps(list(record.allowed_models)), record.requests_per_minute, record.tokens_per_minute,
                    int(record.traffic_class), now.isoformat(),
                    record.expire_time.isoformat() if record.expire_time else None, version,
                ),
            )
            return version

        return record, secret, digest, insert

    def find_by_secret(self, secret: str) -> ApiKeyRecord | None:
        """The key whose secret this is (valid or not), or None; from memory, kept current (see above)."""
        digest = self._hash(secret)
        record = self._by_hash.get(digest)
        if record is not None or not self._store.available:
            return record  # the database away: only keys already in memory are known
        try:
            return self._found(self._store.read(_by_hash(digest)))
        except Unavailable:
            return None

    async def afind_by_secret(self, secret: str) -> ApiKeyRecord | None:
        """`find_by_secret`, looking up a secret memory lacks on a worker thread."""
        digest = self._hash(secret)
        record = self._by_hash.get(digest)
        if record is not None or not self._store.available:
            return record
        try:
            return self._found(await self._store.aread(_by_hash(digest)))
        except Unavailable:
            return None

    def get(self, key_id: str) -> ApiKeyRecord:
        return self._in_memory(key_id) or self._stored(key_id, self._store.read(_by_id(key_id)))

    async def aget(self, key_id: str) -> ApiKeyRecord:
        """`get`, reading a key memory lacks on a worker thread."""
        return self._in_memory(key_id) or self._stored(key_id, await self._store.aread(_by_id(key_id)))

    def list(self, tenant_id: str = "", include_revoked: bool = False) -> list[ApiKeyRecord]:
        return [self._record(row) for row in self._store.read(_listing(tenant_id, include_revoked))]

    async def alist(self, tenant_id: str = "", include_revoked: bool = False) -> builtins.list[ApiKeyRecord]:
        """`list`, read on a worker thread."""
        return [self._record(row) for row in await self._store.aread(_listing(tenant_id, include_revoked))]

    def revoke(self, key_id: str) -> ApiKeyRecord:
        """Revoke a key (idempotent: revoking twice keeps the first revoke time)."""
        return self._stored(key_id, self._store.write(self._revocation(key_id)))

    async def arevoke(self, key_id: str) -> ApiKeyRecord:
        """`revoke`, written on a worker thread."""
        return self._stored(key_id, await self._store.awrite(self._revocation(key_id)))

    def _revocation(self, key_id: str) -> Callable[[Tx], Row | None]:
        def update(tx: Tx) -> Row | None:
            row = tx.one("SELECT revoke_time FROM api_keys WHERE key_id = ?", (key_id,))
            if row is not None and row["revoke_time"] is None:
                tx.execute("UPDATE api_keys SET revoke_time = ?, version = ? WHERE key_id = ?",
                           (self._clock().isoformat(), tx.bump("keys"), key_id))
            return tx.one(f"SELECT {_COLUMNS} FROM api_keys WHERE key_id = ?", (key_id,))

        return update

    def _in_memory(self, key_id: str) -> ApiKeyRecord | None:
        known = self._by_id.get(key_id)
        return self._by_hash.get(known[1]) if known else None

    def _found(self, row: Row | None) -> ApiKeyRecord | None:
        """The key a row read from the database holds, taken into memory (None: no such key)."""
        if row is None:
            return None
        self._apply([row])
        return self._record(row)

    def _stored(self, key_id: str, row: Row | None) -> ApiKeyRecord:
        record = self._found(row)
        if record is None:
            raise NotFound(f"no API key with id {key_id!r}", field="key_id")
        return record

    def _apply(self, rows: builtins.list[Row]) -> None:
        """Take these rows into memory, unless memory already holds a newer version of the key."""
        for row in rows:
            self._remember(int(row["version"]), row["secret_hash"], self._record(row))

    def _remember(self, version: int, digest: str, record: ApiKeyRecord) -> None:
        with self._lock:
            known = self._by_id.get(record.key_id)
            if known is not None and known[0] > version:
                return
            self._by_id[record.key_id] = (version, digest)
            self._by_hash[digest] = record

    @staticmethod
    def _record(row: Row) -> ApiKeyRecord:
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


def _by_hash(digest: str) -> Callable[[Tx], Row | None]:
    return lambda tx: tx.one(f"SELECT {_COLUMNS} FROM api_keys WHERE secret_hash = ?", (digest,))


def _by_id(key_id: str) -> Callable[[Tx], Row | None]:
    return lambda tx: tx.one(f"SELECT {_COLUMNS} FROM api_keys WHERE key_id = ?", (key_id,))


def _listing(tenant_id: str, include_revoked: bool) -> Callable[[Tx], list[Row]]:
    sql, args = f"SELECT {_COLUMNS} FROM api_keys WHERE 1 = 1", list[str]()
    if tenant_id:
        sql, args = sql + " AND tenant_id = ?", [tenant_id]
    if not include_revoked:
        sql += " AND revoke_time IS NULL"
    return lambda tx: tx.all(sql + " ORDER BY create_time, key_id", args)
