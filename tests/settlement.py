"""Waiting until usage has settled, so an "exactly once" check also sees an event that lands late.

Stopping as soon as billing holds the expected number of events and then asserting equality can never
see a duplicate that arrives a moment later. `settled_usage` instead waits until the settlement path is
idle: the router's usage spool and settlement journal hold nothing (`router_backlog`), billing holds at
least the expected events, and billing's count has not changed for a settle window past the last
change. Only then does the caller assert; an overall deadline bounds the wait.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Awaitable, Callable, Sequence
from contextlib import closing
from pathlib import Path
from typing import TypeVar

from services.router.spool import unsettled_events

R = TypeVar("R")

SETTLE_WINDOW_S = 1.0  # well past a settle that follows the answer (milliseconds) and the spool's 1 s replay tick
SETTLE_TIMEOUT_S = 60.0


def router_backlog(data_dir: Path) -> int:
    """Usage events a router (by its data dir) still has to hand to billing: its spool plus the events
    its settlement journal holds answered but not settled."""
    spool = data_dir / "usage_spool.db"
    if not spool.exists():  # a wrong path must not read as "nothing pending"
        raise AssertionError(f"{data_dir} is not a router's data dir (no usage_spool.db)")
    with closing(sqlite3.connect(spool, timeout=10)) as conn:
        pending = int(conn.execute("SELECT COUNT(*) FROM spool").fetchone()[0])
    return pending + unsettled_events(data_dir / "usage_journal.bin")


async def settled_usage(read: Callable[[], Awaitable[R]], count: Callable[[R], int], expected: int, what: str,
                        routers: Sequence[Path] = (), window_s: float = SETTLE_WINDOW_S,
                        timeout_s: float = SETTLE_TIMEOUT_S, interval_s: float = 0.1) -> R:
    """The last reading of billing (`read`) once the settlement path is idle: `count(reading)` is at
    least `expected`, every router in `routers` (data dirs) has an empty backlog, and the count has not
    changed for `window_s`. Fails naming `what` when that does not happen within `timeout_s`."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    reading = await read()
    seen, changed_at = count(reading), loop.time()
    while True:
        backlog = sum(router_backlog(path) for path in routers)
        now = loop.time()
        if seen >= expected and backlog == 0 and now - changed_at >= window_s:
            return reading
        if now >= deadline:
            raise AssertionError(
                f"usage did not settle within {timeout_s:g} s for {what}: billing holds {seen} of {expected}"
                f" expected events, the routers still hold {backlog}")
        await asyncio.sleep(interval_s)
        reading = await read()
        if (now_seen := count(reading)) != seen:
            seen, changed_at = now_seen, loop.time()
