"""Storage of the router's keys, policies, registry and audit log, conversations and batch jobs: one
interface (`Store`, `Tx`), SQLite and PostgreSQL implementations, versioned migrations per domain."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from services.router.store.base import Row, Store, Tx


@dataclass(frozen=True)
class RouterStores:
    """The store of each domain: on SQLite a file each (as routers always kept them), on PostgreSQL one."""

    keys: Store
    policies: Store
    registry: Store
    contexts: Store
    jobs: Store

    @property
    def available(self) -> bool:
        """False while any domain's database cannot be reached (readiness: `GET /ready`)."""
        return all(store.available for store in (self.keys, self.policies, self.registry, self.contexts, self.jobs))


def open_store(database: str, *, poll_s: float = 0.25, pool_size: int = 8) -> Store:
    """The store a URL names: `sqlite:///PATH` or `postgresql://...`."""
    if database.startswith("sqlite:///"):
        from services.router.store.sqlite_store import SqliteStore

        return SqliteStore(Path(database.removeprefix("sqlite:///")), poll_s=poll_s)
    if database.startswith(("postgresql://", "postgres://")):
        from services.router.store.postgres_store import PostgresStore

        return PostgresStore(database, pool_size=pool_size, poll_s=poll_s)
    raise ValueError(f"unsupported router.database {database!r}: use postgresql://... (empty: SQLite in data_dir)")


def open_stores(database: str, data_dir: Path, *, poll_s: float = 0.25) -> RouterStores:
    """The one database `database` names (every domain in it); when empty, a SQLite file per domain in
    `data_dir`."""
    if database:
        shared = open_store(database, poll_s=poll_s)
        return RouterStores(shared, shared, shared, shared, shared)
    files = {name: open_store(f"sqlite:///{data_dir / f'{name}.db'}", poll_s=poll_s)
             for name in ("keys", "policies", "registry", "contexts", "jobs")}
    return RouterStores(**files)


__all__ = ["RouterStores", "Row", "Store", "Tx", "open_store", "open_stores"]
