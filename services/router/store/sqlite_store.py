"""The embedded store: a SQLite file in WAL mode (the default of `make run`).

Every thread that runs units (the event loop's for in-memory-first callers, the workers of `aread` /
`awrite`, the watcher) has its own connection; a write is one `BEGIN IMMEDIATE` transaction, so writers
queue on the file's lock (busy timeout 10 s) and several router processes may share one file: each
follows the others' changes by polling the version counters.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import structlog

from services.router.store.base import Migration, Row
from services.router.store.migrations import CHANGES, migrate
from services.router.store.watcher import Watcher

log = structlog.get_logger(__name__)
T = TypeVar("T")


class SqliteTx:
    dialect = "sqlite"

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn

    def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        return self._conn.execute(sql, params).rowcount

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        self._conn.executemany(sql, rows)

    def one(self, sql: str, params: Sequence[Any] = ()) -> Row | None:
        row: Row | None = self._conn.execute(sql, params).fetchone()
        return row

    def all(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        return list(self._conn.execute(sql, params).fetchall())

    def columns(self, table: str) -> set[str]:
        return {row["name"] for row in self._conn.execute(f"PRAGMA table_info({table})")}

    def bump(self, domain: str) -> int:
        row = self._conn.execute("UPDATE router_changes SET version = version + 1 WHERE domain = ? RETURNING version",
                                 (domain,)).fetchone()
        return int(row["version"])


def _connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(str(path), timeout=10, isolation_level=None, check_same_thread=False)
    conn.row_factory = sqlite3.Row
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    return conn


class SqliteStore:
    dialect = "sqlite"

    def __init__(self, path: Path, *, poll_s: float = 0.25) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        self._conns: list[sqlite3.Connection] = []
        self._conns_lock = threading.Lock()
        self._closed = False
        self._watcher = Watcher(f"router-sqlite-{self.path.stem}", self.read, poll_s)
        self.migrate("changes", CHANGES)

    def _conn(self) -> sqlite3.Connection:
        if self._closed:
            raise RuntimeError(f"the router store {self.path} is closed")
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = _connect(self.path)
            with self._conns_lock:
                self._conns.append(conn)
        return conn

    def migrate(self, domain: str, migrations: Sequence[Migration]) -> None:
        applied = self.write(lambda tx: migrate(tx, domain, migrations, int(time.time() * 1e6)))
        if applied:
            log.info("router_schema_migrated", database="sqlite", path=str(self.path), domain=domain, versions=applied)

    def read(self, fn: Callable[[SqliteTx], T]) -> T:
        conn = self._conn()
        conn.execute("BEGIN")
        try:
            return fn(SqliteTx(conn))
        finally:
            conn.execute("ROLLBACK")

    def write(self, fn: Callable[[SqliteTx], T]) -> T:
        conn = self._conn()
        conn.execute("BEGIN IMMEDIATE")
        try:
            result = fn(SqliteTx(conn))
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
        return result

    async def aread(self, fn: Callable[[SqliteTx], T]) -> T:
        return await asyncio.to_thread(self.read, fn)

    async def awrite(self, fn: Callable[[SqliteTx], T]) -> T:
        return await asyncio.to_thread(self.write, fn)

    @property
    def available(self) -> bool:
        return self._watcher.available

    def watch(self, domain: str, table: str, since: int, apply: Callable[[list[Row]], None]) -> None:
        self._watcher.add(domain, table, since, apply)

    def close(self) -> None:
        if self._closed:
            return
        self._watcher.stop()
        self._closed = True
        with self._conns_lock:
            for conn in self._conns:
                conn.close()
            self._conns.clear()
