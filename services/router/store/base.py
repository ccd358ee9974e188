"""The storage interface the router's domain modules are written against (keys, policies, registry and
audit, conversations, batch jobs).

A unit of work is a plain synchronous function `fn(tx) -> result` over a `Tx`: SQL with `?` placeholders,
portable between SQLite and PostgreSQL, rows read by column name (`row["key_id"]`). A `Store` runs it in
one transaction: `write(fn)` commits it whole or, when it raises, writes nothing; `read(fn)` is read-only.
`aread` / `awrite` run the same unit on a worker thread, so a caller on the event loop never waits on the
database: everything the router does while serving a call uses them (the domain modules' `a`-prefixed
operations); `read` / `write` are for start-up, worker threads and tests.

Shared state that routers cache in memory (keys, policies, the model registry) lives in versioned rows:
each write of such a row takes the next version of its domain with `tx.bump(domain)` and stores it in the
row's `version` column. The domain's counter row stays locked until the transaction commits, so versions
commit in order, and `watch` can follow a domain cheaply: it re-reads the counters (and, on PostgreSQL,
wakes at once on the NOTIFY each bump sends) and hands the rows newer than the last it saw to the domain.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol, TypeVar

T = TypeVar("T")
Row = Mapping[str, Any]
# A migration step: a statement (with {int} / {serial} / {blob} type names) or a function of the open tx.
Step = str | Callable[["Tx"], None]
Migration = tuple[int, str, Sequence[Step]]

TYPES = {
    "sqlite": {"serial": "INTEGER PRIMARY KEY AUTOINCREMENT", "int": "INTEGER"},
    "postgres": {"serial": "BIGSERIAL PRIMARY KEY", "int": "BIGINT"},
}


class Tx(Protocol):
    dialect: str

    def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        """Run a statement; returns the number of rows it changed."""
        ...

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None: ...

    def one(self, sql: str, params: Sequence[Any] = ()) -> Row | None: ...

    def all(self, sql: str, params: Sequence[Any] = ()) -> list[Row]: ...

    def columns(self, table: str) -> set[str]:
        """The column names of `table` (empty when it does not exist)."""
        ...

    def bump(self, domain: str) -> int:
        """The next version of `domain`'s shared rows; other routers see it once this transaction commits."""
        ...


class Store(Protocol):
    dialect: str

    @property
    def available(self) -> bool:
        """False while the watcher cannot reach the database (memory keeps serving what it holds)."""
        ...

    def migrate(self, domain: str, migrations: Sequence[Migration]) -> None:
        """Apply `domain`'s pending migrations (each once, in order, in one transaction)."""
        ...

    def read(self, fn: Callable[[Tx], T]) -> T: ...

    def write(self, fn: Callable[[Tx], T]) -> T: ...

    async def aread(self, fn: Callable[[Tx], T]) -> T: ...

    async def awrite(self, fn: Callable[[Tx], T]) -> T: ...

    def watch(self, domain: str, table: str, since: int, apply: Callable[[list[Row]], None]) -> None:
        """Call `apply` with `table`'s rows whose version is above `since`, whenever `domain` moves on
        (within `poll_s`; at once on PostgreSQL). It runs on the event loop that was running when `watch`
        was called (or on the watcher's thread when none was)."""
        ...

    def close(self) -> None: ...
