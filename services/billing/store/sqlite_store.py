"""The embedded store: one SQLite file in WAL mode.

Durability: `synchronous=FULL` by default — the WAL is fsynced before every commit returns, so an
acknowledged event survives a power cut, not only a process crash (NORMAL would only survive the latter).
Speed comes from group commit instead: every write goes through ONE writer thread and connection, which
takes all units of work queued at that moment (up to `max_batch`), runs them in one `BEGIN IMMEDIATE`
transaction — each in its own savepoint, so one failing unit rolls back alone — commits once (one fsync),
and only then answers their callers (one wake-up of the event loop per commit). Because there is a single writer, a Reserve's check of spend + holds
and its insert of the new hold cannot interleave with another write: no budget can be overshot.
Reads use other connections in their own threads (WAL lets them run beside the writer); a read that must see
every acknowledged write and is answered from the book (`read_current`: a budget check) runs in the writer
instead, between the batch's units, and is answered after its commit, with the rest of the batch.

One process per database file: the store holds an exclusive lock on `<file>.lock` while open, so the
writer's in-memory book of budget spend and holds (see `book`) is the only writer's view and therefore
authoritative. Several billing processes need PostgreSQL.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import structlog

from services.billing.book import Book
from services.billing.store.base import Row
from services.billing.store.migrations import migrate
from services.common.errors import DomainError

log = structlog.get_logger(__name__)
T = TypeVar("T")
READERS = 4


class SqliteTx:
    dialect = "sqlite"

    def __init__(self, conn: sqlite3.Connection, book: Book | None = None) -> None:
        self._conn = conn
        self.memo: dict[str, Any] = {}
        self.book = book

    def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        return self._conn.execute(sql, params).rowcount

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        self._conn.executemany(sql, rows)

    def changed_catalog(self) -> None:
        self.memo.clear()
        if self.book is not None:
            self.book.clear()

    def one(self, sql: str, params: Sequence[Any] = ()) -> Row | None:
        row: Row | None = self._conn.execute(sql, params).fetchone()
        return row

    def all(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        return list(self._conn.execute(sql, params).fetchall())

    def lock_budgets(self, budget_ids: Sequence[str]) -> None:
        """Nothing to do: the single writer already serialises every write."""


@dataclass
class _Work:
    fns: Sequence[Callable[[SqliteTx], Any]]
    future: asyncio.Future[list[Any]]
    loop: asyncio.AbstractEventLoop
    many: bool = False
    read_only: bool = False
    results: list[Any] = field(default_factory=list)


def _connect(path: str, synchronous: str) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute(f"PRAGMA synchronous={synchronous}")
    conn.execute("PRAGMA foreign_keys=ON")
    conn.execute("PRAGMA busy_timeout=30000")
    conn.execute("PRAGMA temp_store=MEMORY")  # the roll's temporary table of a second's groups: no temp file
    return conn


class SqliteStore:
    dialect = "sqlite"

    def __init__(self, path: str, *, synchronous: str = "FULL", max_batch: int = 1024) -> None:
        self.path = path
        self.synchronous = synchronous.upper()
        self.max_batch = max_batch
        self._queue: queue.SimpleQueue[_Work | None] = queue.SimpleQueue()
        self._writer: threading.Thread | None = None
        # Readers: a few threads, each with its own connection (WAL lets them read beside the writer).
        self._readers: ThreadPoolExecutor | None = None
        self._reader_local = threading.local()
        self._reader_conns: list[sqlite3.Connection] = []
        self._reader_conns_lock = threading.Lock()
        self._lock_fd: int | None = None
        self.book = Book()
        self.commits = 0

    def _lock_file(self) -> None:
        fd = os.open(f"{self.path}.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RuntimeError(f"another billing process already uses {self.path}; one process per SQLite "
                               "database (use PostgreSQL to run several)") from None
        self._lock_fd = fd

    async def open(self) -> None:
        Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self._lock_file()
        conn = _connect(self.path, self.synchronous)
        conn.execute("BEGIN IMMEDIATE")
        try:
            applied = migrate(SqliteTx(conn), int(time.time() * 1e6))
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        if applied:
            log.info("billing_schema_migrated", database="sqlite", path=self.path, versions=applied)
        self._writer = threading.Thread(target=self._write_loop, args=(conn,), name="billing-sqlite-writer",
                                        daemon=True)
        self._writer.start()
        self._readers = ThreadPoolExecutor(max_workers=READERS, thread_name_prefix="billing-sqlite-reader")

    async def write(self, fn: Callable[[SqliteTx], T]) -> T:
        return await self._one(fn, read_only=False)

    async def write_many(self, fns: Sequence[Callable[[SqliteTx], T]]) -> list[T | DomainError]:
        results = await self._submit(fns, many=True)
        for result in results:
            if isinstance(result, BaseException) and not isinstance(result, DomainError):
                raise result
        return results

    async def read_current(self, fn: Callable[[SqliteTx], T]) -> T:
        return await self._one(fn, read_only=True)

    async def _one(self, fn: Callable[[SqliteTx], T], read_only: bool) -> T:
        result = (await self._submit([fn], many=False, read_only=read_only))[0]
        if isinstance(result, BaseException):
            raise result
        return result  # type: ignore[no-any-return]

    async def read(self, fn: Callable[[SqliteTx], T]) -> T:
        if self._readers is None:
            raise RuntimeError("store is not open")
        return await asyncio.get_running_loop().run_in_executor(self._readers, self._read, fn)

    def _read(self, fn: Callable[[SqliteTx], T]) -> T:
        conn: sqlite3.Connection | None = getattr(self._reader_local, "conn", None)
        if conn is None:
            conn = self._reader_local.conn = _connect(self.path, self.synchronous)
            with self._reader_conns_lock:
                self._reader_conns.append(conn)
        conn.execute("BEGIN")
        try:
            return fn(SqliteTx(conn))
        finally:
            conn.execute("ROLLBACK")

    async def close(self) -> None:
        if self._writer is not None:
            self._queue.put(None)
            await asyncio.to_thread(self._writer.join)
            self._writer = None
        if self._readers is not None:
            self._readers.shutdown(wait=True)
            self._readers = None
        with self._reader_conns_lock:
            for conn in self._reader_conns:
                conn.close()
            self._reader_conns.clear()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    async def _submit(self, fns: Sequence[Callable[[SqliteTx], Any]], many: bool,
                      read_only: bool = False) -> list[Any]:
        if self._writer is None:
            raise RuntimeError("store is not open")
        loop = asyncio.get_running_loop()
        work = _Work(fns=fns, future=loop.create_future(), loop=loop, many=many, read_only=read_only)
        self._queue.put(work)
        return await asyncio.shield(work.future)

    # --- the writer thread -------------------------------------------------------------------
    def _write_loop(self, conn: sqlite3.Connection) -> None:
        tx = SqliteTx(conn, self.book)
        while True:
            first = self._queue.get()
            if first is None:
                break
            batch = [first]
            units = len(first.fns)
            stop = False
            while units < self.max_batch:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    stop = True
                    break
                batch.append(nxt)
                units += len(nxt.fns)
            self._run_batch(conn, tx, batch)
            if stop:
                break
        conn.close()

    def _run_batch(self, conn: sqlite3.Connection, tx: SqliteTx, batch: list[_Work]) -> None:
        tx.memo = {}
        try:
            conn.execute("BEGIN IMMEDIATE")
            for work in batch:
                run = self._run_read if work.read_only else self._run_unit
                work.results = [run(conn, tx, fn) for fn in work.fns]
            conn.execute("COMMIT")
            self.commits += 1
        except BaseException as error:  # the commit failed: nothing of this batch is durable
            log.error("billing_commit_failed", exc_info=error)
            self.book.clear()
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            for work in batch:
                work.results = [error] * len(work.fns)
        by_loop: dict[asyncio.AbstractEventLoop, list[_Work]] = {}
        for work in batch:
            by_loop.setdefault(work.loop, []).append(work)
        for loop, answered in by_loop.items():  # one wake-up of each event loop per commit, not one per unit
            loop.call_soon_threadsafe(_resolve, answered)

    def _run_unit(self, conn: sqlite3.Connection, tx: SqliteTx, fn: Callable[[SqliteTx], Any]) -> Any:
        conn.execute("SAVEPOINT unit")
        try:
            result = fn(tx)
        except Exception as error:
            self.book.clear()  # the unit may have changed the book before it failed
            conn.execute("ROLLBACK TO unit")
            conn.execute("RELEASE unit")
            if not isinstance(error, DomainError):
                log.error("billing_unit_failed", exc_info=error)
            return error
        conn.execute("RELEASE unit")
        return result

    @staticmethod
    def _run_read(conn: sqlite3.Connection, tx: SqliteTx, fn: Callable[[SqliteTx], Any]) -> Any:
        """A read-only unit: no savepoint to roll back to (it writes nothing; what it loads into the book
        is what the transaction holds)."""
        try:
            return fn(tx)
        except Exception as error:
            if not isinstance(error, DomainError):
                log.error("billing_unit_failed", exc_info=error)
            return error


def _resolve(answered: list[_Work]) -> None:
    for work in answered:
        if not work.future.done():
            work.future.set_result(work.results)
