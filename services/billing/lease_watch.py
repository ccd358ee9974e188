"""Budget changes pushed to the routers that hold (or may need) leases, so a change binds them at once.

A router admits in-process only against its leases, and learns which hard budgets apply to a caller when
it acquires that caller's leases. A budget created, lowered or deleted in between would bind the router
only from its next refresh; this module closes that gap. Every router keeps one `WatchLeases` stream
open (`Watchers.subscribe`). A budget change runs as

1. `changing(scope, budget_id)`: no AcquireLeases runs meanwhile (those in progress finish first, new ones
   wait), and every watching router is sent the change and asked to answer: it stops admitting
   in-process for the callers the scope binds (they go to per-request Reserve) and reports what it
   consumed of its lease on the changed budget (`AckLeaseChange`). The wait for the answers has a
   deadline (`ack_timeout_s`): a router that does not answer in time is logged and counted.
2. the change commits, returning the reported leases to what their routers consumed (`leases.return_lease`
   semantics) in the same transaction, and AcquireLeases resumes: a router's next lease for those callers
   is computed under the new budget.

So once the change commits, what can still be spent under the old rules is exactly what was in flight
then (admitted under a lease or a hold before the commit). Alert levels a budget reaches are pushed
without waiting (`notify`): the routers re-acquire the callers' leases, which carry the level; so are
price changes (`prices_changed`): the routers reload the price table they quote from, and poll it only
rarely while they watch.

A router that was not watching when a change was sent (reconnecting, or cut off from billing) is sent
"drop what you knew, reload the prices" as the first message of its next stream; until then it spends at most the room of
the leases it holds. With several billing processes on one database, a change reaches the routers
watching the process that commits it.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import structlog

from services.billing import metrics
from services.billing.model import Scope, ScopeKind

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class LeaseChange:
    """One message to the routers: a budget's scope changed (ScopeKind.UNSPECIFIED: every caller)."""

    revision: int
    scope: Scope
    budget_id: str = ""
    ack_wanted: bool = False
    prices_changed: bool = False  # reload the price table (then it binds no caller)


@dataclass
class Watcher:
    router_id: str
    queue: asyncio.Queue[LeaseChange] = field(default_factory=asyncio.Queue)


class _Gate:
    """Many AcquireLeases at once, or one budget change alone."""

    def __init__(self) -> None:
        self._active = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._open = asyncio.Event()
        self._open.set()
        self._changes = asyncio.Lock()

    @contextlib.asynccontextmanager
    async def shared(self) -> AsyncIterator[None]:
        while not self._open.is_set():
            await self._open.wait()
        self._active += 1
        self._idle.clear()
        try:
            yield
        finally:
            self._active -= 1
            if not self._active:
                self._idle.set()

    @contextlib.asynccontextmanager
    async def exclusive(self) -> AsyncIterator[None]:
        async with self._changes:
            self._open.clear()
            try:
                await self._idle.wait()
                yield
            finally:
                self._open.set()


class Watchers:
    def __init__(self, ack_timeout_s: float = 1.0) -> None:
        self.ack_timeout_s = ack_timeout_s
        self._watchers: dict[int, Watcher] = {}
        self._ids = itertools.count(1)
        self._revisions = itertools.count(1)
        # revision -> (routers not yet answered, lease id -> (router id, consumed), all answered)
        self._pending: dict[int, tuple[set[str], dict[str, tuple[str, int]], asyncio.Event]] = {}
        self._gate = _Gate()

    def subscribe(self, router_id: str) -> tuple[int, Watcher]:
        """A router's stream: its first message asks it to drop whatever it knew."""
        watcher = Watcher(router_id)
        handle = next(self._ids)
        self._watchers[handle] = watcher
        watcher.queue.put_nowait(LeaseChange(next(self._revisions), Scope(ScopeKind.UNSPECIFIED),
                                             prices_changed=True))
        return handle, watcher

    def unsubscribe(self, handle: int) -> None:
        watcher = self._watchers.pop(handle, None)
        if watcher is None:
            return
        for waiting, _, done in self._pending.values():  # a router that left cannot answer
            waiting.discard(watcher.router_id)
            if not waiting:
                done.set()

    def acquiring(self) -> contextlib.AbstractAsyncContextManager[None]:
        """Held while leases are granted: a budget change waits for it, and it waits for a change."""
        return self._gate.shared()

    @contextlib.asynccontextmanager
    async def changing(self, scope: Scope, budget_id: str = "") -> AsyncIterator[dict[str, tuple[str, int]]]:
        """Around a budget change's commit: yields, per lease id, the router that reported it and what it
        consumed (to return the changed budget's leases to that in the commit)."""
        async with self._gate.exclusive():
            revision = next(self._revisions)
            routers = {w.router_id for w in self._watchers.values()}
            consumed: dict[str, tuple[str, int]] = {}
            done = asyncio.Event()
            self._pending[revision] = (set(routers), consumed, done)
            change = LeaseChange(revision, scope, budget_id, ack_wanted=True)
            for watcher in self._watchers.values():
                watcher.queue.put_nowait(change)
            if not routers:
                done.set()
            try:
                await asyncio.wait_for(done.wait(), self.ack_timeout_s)
            except TimeoutError:
                late = sorted(self._pending[revision][0])
                metrics.LEASES.labels("change_unanswered").inc(len(late))
                log.warning("lease_change_unanswered", budget_id=budget_id, routers=late[:10],
                            timeout_s=self.ack_timeout_s)
            finally:
                self._pending.pop(revision, None)
            yield consumed

    def ack(self, router_id: str, revision: int, consumed: dict[str, int]) -> bool:
        """A router answered a change; False when billing no longer waits for it (late, or unknown)."""
        pending = self._pending.get(revision)
        if pending is None or router_id not in pending[0]:
            return False
        waiting, reported, done = pending
        waiting.discard(router_id)
        reported.update({lease_id: (router_id, c) for lease_id, c in consumed.items()})
        if not waiting:
            done.set()
        return True

    def prices_changed(self) -> None:
        """A price was created or deleted: the routers reload their price table (they quote from it)."""
        change = LeaseChange(next(self._revisions), Scope(ScopeKind.UNSPECIFIED), prices_changed=True)
        for watcher in self._watchers.values():
            watcher.queue.put_nowait(change)

    def notify(self, scope: Scope, budget_id: str) -> None:
        """A change the routers should follow soon, without waiting for them (a budget's alert level)."""
        change = LeaseChange(next(self._revisions), scope, budget_id)
        for watcher in self._watchers.values():
            watcher.queue.put_nowait(change)
