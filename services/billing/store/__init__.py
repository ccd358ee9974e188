"""Storage of the ledger: one interface (`Store`, `Tx`), SQLite and PostgreSQL implementations."""

from __future__ import annotations

from services.billing.store.base import Store, Tx


def open_store(dsn: str, *, sqlite_synchronous: str = "FULL", pool_size: int = 8, max_batch: int = 1024) -> Store:
    """Open (and migrate) the store a DSN names: `sqlite:///path` or `postgresql://...`."""
    if dsn.startswith("sqlite:///"):
        from services.billing.store.sqlite_store import SqliteStore

        return SqliteStore(dsn.removeprefix("sqlite:///"), synchronous=sqlite_synchronous, max_batch=max_batch)
    if dsn.startswith(("postgresql://", "postgres://")):
        from services.billing.store.postgres_store import PostgresStore

        return PostgresStore(dsn, pool_size=pool_size)
    raise ValueError(f"unsupported database {dsn!r}: use sqlite:///PATH or postgresql://...")


__all__ = ["Store", "Tx", "open_store"]
