"""The storage interface the domain modules are written against.

Domain code is plain synchronous functions `fn(tx) -> result` over a `Tx` (SQL with `?` placeholders,
portable between SQLite and PostgreSQL). A `Store` runs such a function atomically in its own thread(s):

- `write(fn)`: one atomic unit of work. It either commits whole or, when it raises, writes nothing.
- `write_many(fns)`: several units in ONE transaction (one durable commit), each isolated by a savepoint:
  a unit that raises a `DomainError` is rolled back alone and its error returned in its place.
- `read(fn)`: a read-only unit.
- `read_current(fn)`: a read-only unit that sees every write acknowledged before it was asked (a budget
  check): SQLite answers it in the writer from its book, after that batch's commit; PostgreSQL as `read`.

Every modification of a budget's spend or holds first calls `tx.lock_budgets(ids)`: PostgreSQL takes
`SELECT ... FOR UPDATE` row locks (in id order, so two processes cannot deadlock on them); SQLite needs no
lock because all of its writes go through one writer thread inside `BEGIN IMMEDIATE` transactions.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from services.common.errors import DomainError

if TYPE_CHECKING:
    from services.billing.book import Book

T = TypeVar("T")
Row = tuple[Any, ...]


class Tx(Protocol):
    dialect: str
    # Per-transaction memo (e.g. the catalogue version read once per transaction).
    memo: dict[str, Any]
    # The writer's authoritative in-memory book of spend and holds (SQLite writer only; None elsewhere).
    book: Book | None

    def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        """Run a statement; returns the number of rows it changed."""
        ...

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None: ...

    def one(self, sql: str, params: Sequence[Any] = ()) -> Row | None: ...

    def all(self, sql: str, params: Sequence[Any] = ()) -> list[Row]: ...

    def lock_budgets(self, budget_ids: Sequence[str]) -> None: ...

    def changed_catalog(self) -> None:
        """Prices or budgets changed in this transaction: drop what was derived from them."""
        ...


class Store(Protocol):
    dialect: str

    async def open(self) -> None:
        """Connect and apply pending migrations."""
        ...

    async def write(self, fn: Callable[[Tx], T]) -> T: ...

    async def write_many(self, fns: Sequence[Callable[[Tx], T]]) -> list[T | DomainError]: ...

    async def read(self, fn: Callable[[Tx], T]) -> T: ...

    async def read_current(self, fn: Callable[[Tx], T]) -> T: ...

    async def close(self) -> None: ...
