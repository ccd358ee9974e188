"""The PostgreSQL store (psycopg 3 and its connection pool): several routers share one database.

The router's tables live in the schema `router` (so the database may be the one billing uses). Each unit
runs in its own READ COMMITTED transaction on a pooled connection; deadlocks and serialization failures
are retried a few times. A bump sends `NOTIFY autoglm_router_changes` with the transaction, and the
watcher LISTENs on a connection of its own: other routers hear of a change as soon as it commits, and
the version poll every `poll_s` still catches up if a notification is lost with a connection.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import psycopg
import structlog
from psycopg import errors as pg_errors
from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool, PoolTimeout

from services.common.errors import Unavailable
from services.router.store.base import Migration, Row
from services.router.store.migrations import CHANGES, migrate
from services.router.store.watcher import Watcher

log = structlog.get_logger(__name__)
T = TypeVar("T")
RETRIABLE = (pg_errors.DeadlockDetected, pg_errors.SerializationFailure)
MIGRATION_LOCK = 0x726F7574  # advisory lock key: one router migrates at a time
CHANNEL = "autoglm_router_changes"
SCHEMA = "router"


def _sql(sql: str) -> str:
    return sql.replace("?", "%s")


class PostgresTx:
    dialect = "postgres"

    def __init__(self, conn: psycopg.Connection[Any]) -> None:
        self._conn = conn

    def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        return self._conn.execute(_sql(sql), params).rowcount  # type: ignore[arg-type]

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        with self._conn.cursor() as cur:
            cur.executemany(_sql(sql), rows)  # type: ignore[arg-type]

    def one(self, sql: str, params: Sequence[Any] = ()) -> Row | None:
        row: Row | None = self._conn.execute(_sql(sql), params).fetchone()  # type: ignore[arg-type]
        return row

    def all(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        return list(self._conn.execute(_sql(sql), params).fetchall())  # type: ignore[arg-type]

    def columns(self, table: str) -> set[str]:
        rows = self.all("SELECT column_name FROM information_schema.columns WHERE table_schema = ? AND table_name = ?",
                        (SCHEMA, table))
        return {row["column_name"] for row in rows}

    def bump(self, domain: str) -> int:
        row = self.one("UPDATE router_changes SET version = version + 1 WHERE domain = ? RETURNING version", (domain,))
        assert row is not None, f"no version counter for {domain!r}"
        self._conn.execute("SELECT pg_notify(%s, %s)", (CHANNEL, domain))
        return int(row["version"])


def _configure(conn: psycopg.Connection[Any]) -> None:
    conn.execute(f"SET search_path TO {SCHEMA}")


class PostgresStore:
    dialect = "postgres"

    def __init__(self, dsn: str, *, pool_size: int = 8, poll_s: float = 0.25, connect_timeout_s: float = 30.0,
                 wait_s: float = 2.0) -> None:
        self.dsn = dsn
        self._closed = False
        with psycopg.connect(dsn, autocommit=True) as conn:
            with conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
                conn.execute(f"CREATE SCHEMA IF NOT EXISTS {SCHEMA}")
        self._pool: ConnectionPool[psycopg.Connection[Any]] = ConnectionPool(
            dsn, min_size=1, max_size=pool_size, open=False, configure=_configure, timeout=wait_s,
            kwargs={"autocommit": True, "row_factory": dict_row}, name="router-store")
        self._pool.open(wait=True, timeout=connect_timeout_s)
        self._listener: psycopg.Connection[Any] | None = None
        self._watcher = Watcher("router-postgres", self.read, poll_s, wait=self._wait_for_notify)
        self.migrate("changes", CHANGES)

    def migrate(self, domain: str, migrations: Sequence[Migration]) -> None:
        def body(tx: PostgresTx) -> list[int]:
            tx.execute("SELECT pg_advisory_xact_lock(?)", (MIGRATION_LOCK,))
            return migrate(tx, domain, migrations, int(time.time() * 1e6))

        applied = self.write(body)
        if applied:
            log.info("router_schema_migrated", database="postgres", domain=domain, versions=applied)

    def _run(self, fn: Callable[[PostgresTx], T]) -> T:
        if self._closed:
            raise RuntimeError("the router store is closed")
        for attempt in range(8):
            try:
                with self._pool.connection() as conn:
                    try:
                        with conn.transaction():
                            return fn(PostgresTx(conn))
                    except RETRIABLE:
                        if attempt == 7:
                            raise
            except (PoolTimeout, psycopg.OperationalError) as error:
                raise Unavailable("the router's database cannot be reached; try again shortly",
                                  reason="DATABASE_UNAVAILABLE") from error
            time.sleep(0.002 * (2**attempt))
        raise AssertionError("unreachable")

    def read(self, fn: Callable[[PostgresTx], T]) -> T:
        return self._run(fn)

    def write(self, fn: Callable[[PostgresTx], T]) -> T:
        return self._run(fn)

    async def aread(self, fn: Callable[[PostgresTx], T]) -> T:
        return await asyncio.to_thread(self._run, fn)

    async def awrite(self, fn: Callable[[PostgresTx], T]) -> T:
        return await asyncio.to_thread(self._run, fn)

    @property
    def available(self) -> bool:
        return self._watcher.available

    def watch(self, domain: str, table: str, since: int, apply: Callable[[list[Row]], None]) -> None:
        self._watcher.add(domain, table, since, apply)

    def _wait_for_notify(self, timeout: float) -> None:
        """Wait until a change is notified or `timeout` passes (runs on the watcher's thread)."""
        try:
            if self._listener is None or self._listener.closed:
                self._listener = psycopg.connect(self.dsn, autocommit=True)
                self._listener.execute(f"LISTEN {CHANNEL}")
                return  # poll once more: a change may have committed before LISTEN
            for _ in self._listener.notifies(timeout=timeout, stop_after=1):
                pass
        except psycopg.Error as error:
            if self._listener is not None:  # it was listening: say so once (the watcher logs the outage)
                log.warning("router_store_listen_lost", error=str(error))
                self._listener.close()
            self._listener = None
            time.sleep(timeout)  # the database is away: retry at the polling pace

    def close(self) -> None:
        if self._closed:
            return
        self._watcher.stop()
        self._closed = True
        self._pool.close()
        if self._listener is not None:
            self._listener.close()
