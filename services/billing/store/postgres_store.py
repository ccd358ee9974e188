"""The PostgreSQL store (psycopg 3): several billing processes may share one database.

Each unit of work runs in its own READ COMMITTED transaction on a connection of a small per-process pool
(one connection per worker thread). Budgets cannot be overshot across processes because every change to a
budget's spend or holds first locks the budget rows with `SELECT ... FOR UPDATE`, in id order; the
idempotency of events and holds rests on unique constraints (`ON CONFLICT DO NOTHING`), which wait for a
concurrent inserter to commit. Deadlocks and serialization failures are retried a few times.
`write_many` runs its units in one transaction, each in a savepoint (one commit per StreamUsage batch).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import psycopg
import structlog
from psycopg import errors as pg_errors

from services.billing.book import Book
from services.billing.store.base import Row
from services.billing.store.migrations import migrate
from services.common.errors import DomainError

log = structlog.get_logger(__name__)
T = TypeVar("T")
RETRIABLE = (pg_errors.DeadlockDetected, pg_errors.SerializationFailure)
MIGRATION_LOCK = 0x61676C6D  # advisory lock key: one process migrates at a time


def _sql(sql: str) -> str:
    return sql.replace("?", "%s")


class PostgresTx:
    dialect = "postgres"

    def __init__(self, conn: psycopg.Connection[Any]) -> None:
        self._conn = conn
        self.memo: dict[str, Any] = {}
        self.book: Book | None = None  # several processes may write: budget state is always read from the locked rows
        self._locked: set[str] = set()

    def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        return self._conn.execute(_sql(sql), params).rowcount  # type: ignore[arg-type]

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        with self._conn.cursor() as cur:
            cur.executemany(_sql(sql), rows)  # type: ignore[arg-type]

    def changed_catalog(self) -> None:
        self.memo.clear()

    def one(self, sql: str, params: Sequence[Any] = ()) -> Row | None:
        return self._conn.execute(_sql(sql), params).fetchone()  # type: ignore[arg-type]

    def all(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        return list(self._conn.execute(_sql(sql), params).fetchall())  # type: ignore[arg-type]

    def lock_budgets(self, budget_ids: Sequence[str]) -> None:
        ids = sorted(set(budget_ids) - self._locked)
        if ids:
            self._locked.update(ids)
            self._conn.execute("SELECT budget_id FROM budgets WHERE budget_id = ANY(%s) ORDER BY budget_id FOR UPDATE",
                               (ids,))


class PostgresStore:
    dialect = "postgres"

    def __init__(self, dsn: str, *, pool_size: int = 8) -> None:
        self.dsn = dsn
        self.pool_size = pool_size
        self._local = threading.local()
        self._conns: list[psycopg.Connection[Any]] = []
        self._conns_lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None

    async def open(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=self.pool_size, thread_name_prefix="billing-pg")
        await self._run(self._migrate)

    def _migrate(self) -> None:
        conn = self._conn()
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
            applied = migrate(PostgresTx(conn), int(time.time() * 1e6))
        if applied:
            log.info("billing_schema_migrated", database="postgres", versions=applied)

    def _conn(self) -> psycopg.Connection[Any]:
        conn: psycopg.Connection[Any] | None = getattr(self._local, "conn", None)
        if conn is None or conn.closed:
            conn = psycopg.connect(self.dsn, autocommit=True)
            self._local.conn = conn
            with self._conns_lock:
                self._conns.append(conn)
        return conn

    async def _run(self, fn: Callable[[], T]) -> T:
        if self._pool is None:
            raise RuntimeError("store is not open")
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn)

    def _with_retries(self, body: Callable[[psycopg.Connection[Any]], T]) -> T:
        for attempt in range(8):
            conn = self._conn()
            try:
                return body(conn)
            except RETRIABLE:
                if attempt == 7:
                    raise
                time.sleep(0.002 * (2**attempt))
        raise AssertionError("unreachable")

    async def write(self, fn: Callable[[PostgresTx], T]) -> T:
        def body(conn: psycopg.Connection[Any]) -> T:
            with conn.transaction():
                return fn(PostgresTx(conn))

        return await self._run(lambda: self._with_retries(body))

    async def write_many(self, fns: Sequence[Callable[[PostgresTx], T]]) -> list[T | DomainError]:
        def body(conn: psycopg.Connection[Any]) -> list[T | DomainError]:
            results: list[T | DomainError] = []
            with conn.transaction():
                tx = PostgresTx(conn)
                for fn in fns:
                    try:
                        with conn.transaction():  # a savepoint
                            results.append(fn(tx))
                    except DomainError as error:
                        results.append(error)
            return results

        return await self._run(lambda: self._with_retries(body))

    async def read(self, fn: Callable[[PostgresTx], T]) -> T:
        def body(conn: psycopg.Connection[Any]) -> T:
            with conn.transaction():
                return fn(PostgresTx(conn))

        return await self._run(lambda: self._with_retries(body))

    async def read_current(self, fn: Callable[[PostgresTx], T]) -> T:
        """Every committed write is visible to a new transaction: the same as `read`."""
        return await self.read(fn)

    async def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        with self._conns_lock:
            for conn in self._conns:
                conn.close()
            self._conns.clear()
