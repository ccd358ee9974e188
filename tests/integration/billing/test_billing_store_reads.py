"""`Store.read_current`: the read a budget check makes sees every write acknowledged before it, on a real
SQLite file and a real PostgreSQL; on SQLite it runs in the writer (answered with that batch, after its
commit), so a failing read neither breaks the writes batched beside it nor leaves a thread behind."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest

from services.billing.store import open_store
from services.common.errors import InvalidInput


@pytest.fixture
async def store(database: str):  # type: ignore[no-untyped-def]
    opened = open_store(database)
    await opened.open()
    try:
        yield opened
    finally:
        await opened.close()


def _count(tx) -> int:  # type: ignore[no-untyped-def]
    row = tx.one("SELECT COUNT(*) FROM audit WHERE action = 'test.read'")
    return int(row[0]) if row else 0


def _insert(n: int):  # type: ignore[no-untyped-def]
    def unit(tx) -> int:  # type: ignore[no-untyped-def]
        tx.execute("INSERT INTO audit (time_us, actor, action, target, details_json) VALUES (?, ?, ?, ?, ?)",
                   (n, "test", "test.read", f"row/{n}", "{}"))
        return n
    return unit


async def test_read_current_sees_every_acknowledged_write(store) -> None:  # type: ignore[no-untyped-def]
    for n in range(1, 21):
        assert await store.write(_insert(n)) == n
        assert await store.read_current(_count) == n


async def test_a_failing_read_current_fails_alone(store) -> None:  # type: ignore[no-untyped-def]
    def bad(tx) -> int:  # type: ignore[no-untyped-def]
        tx.one("SELECT 1")
        raise InvalidInput("no such budget", field="budget_id")

    outcomes = await asyncio.gather(*(store.write(_insert(n)) for n in range(1, 11)),
                                    store.read_current(bad), return_exceptions=True)
    assert outcomes[:10] == list(range(1, 11))
    assert isinstance(outcomes[10], InvalidInput)
    assert await store.read_current(_count) == 10


async def test_sqlite_read_current_runs_in_the_writer(tmp_path: Path) -> None:
    opened = open_store(f"sqlite:///{tmp_path / 'billing.sqlite3'}")
    await opened.open()
    try:
        seen = await opened.read_current(lambda tx: threading.current_thread().name)
        assert seen == "billing-sqlite-writer"
    finally:
        await opened.close()
