"""`context_id` conversations: turns stored durably per tenant in the router store (SQLite or PostgreSQL,
services/router/store), replayed on the next turn by whichever router serves it.

Trimming rule (when the replayed conversation plus max_tokens does not fit the model's context window):
system messages are always kept; the oldest whole exchanges (a user turn and the answers that followed
it) are dropped first, one at a time, until it fits. The new turn itself is never dropped; if it alone
does not fit, the request fails with INVALID_ARGUMENT.

Retention rule (what is stored, so a conversation never grows without end):
- after each turn is stored, a context keeps at most `max_messages` messages and `max_bytes` bytes of
  content (UTF-8): its oldest exchanges are deleted first; if system messages alone still exceed a
  bound, the oldest of them go next. The newest exchange is always kept (it is at most one prompt under
  the router's max_prompt_bytes plus its answer).
- a context whose last turn is older than `retention_s` is expired: it replays as empty at once, and
  `purge()` (run periodically by the router) deletes it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from services.common.errors import InvalidInput
from services.router.store import Store, Tx, open_store
from services.router.store.migrations import CONTEXTS
from services.router.types import Message, Role

MAX_CONTEXT_ID = 128
DEFAULT_MAX_MESSAGES = 200
DEFAULT_MAX_BYTES = 1024 * 1024
DEFAULT_RETENTION_S = 30 * 86400.0


class ContextStore:
    def __init__(
        self,
        store: Store | Path,
        max_messages: int = DEFAULT_MAX_MESSAGES,
        max_bytes: int = DEFAULT_MAX_BYTES,
        retention_s: float = DEFAULT_RETENTION_S,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._max_messages = max_messages
        self._max_bytes = max_bytes
        self._retention_s = retention_s
        self._clock = clock
        self._store = open_store(f"sqlite:///{store}") if isinstance(store, Path) else store
        self._store.migrate("contexts", CONTEXTS)

    @staticmethod
    def validate(context_id: str) -> None:
        if len(context_id) > MAX_CONTEXT_ID:
            raise InvalidInput(f"context_id is at most {MAX_CONTEXT_ID} characters", field="context_id")

    def _now_us(self) -> int:
        return int(self._clock() * 1_000_000)

    def _cutoff_us(self) -> int:
        return int((self._clock() - self._retention_s) * 1_000_000)

    def history(self, tenant_id: str, context_id: str) -> tuple[Message, ...]:
        rows = self._store.read(lambda tx: tx.all(
            "SELECT role, content, at_us FROM turns WHERE tenant_id = ? AND context_id = ? ORDER BY seq",
            (tenant_id, context_id)))
        if not rows or rows[-1]["at_us"] < self._cutoff_us():
            return ()  # none, or expired (purge deletes it)
        return tuple(Message(Role(r["role"]), r["content"]) for r in rows)

    async def ahistory(self, tenant_id: str, context_id: str) -> tuple[Message, ...]:
        """`history`, read on a worker thread (the event loop does not wait on the database)."""
        return await asyncio.to_thread(self.history, tenant_id, context_id)

    def append(self, tenant_id: str, context_id: str, messages: tuple[Message, ...]) -> None:
        """Store a finished turn, then trim the context by the retention rule above."""
        now = self._now_us()

        def unit(tx: Tx) -> None:
            # The context's turns are locked first (PostgreSQL), so two routers appending to one context
            # at once trim it one after the other.
            tx.all("SELECT seq FROM turns WHERE tenant_id = ? AND context_id = ?" + _FOR_UPDATE[tx.dialect],
                   (tenant_id, context_id))
            last = tx.one("SELECT MAX(at_us) AS last FROM turns WHERE tenant_id = ? AND context_id = ?",
                          (tenant_id, context_id))
            if last is not None and last["last"] is not None and last["last"] < self._cutoff_us():
                # an expired context starts afresh: its old turns must not come back with this one
                tx.execute("DELETE FROM turns WHERE tenant_id = ? AND context_id = ?", (tenant_id, context_id))
            tx.executemany(
                "INSERT INTO turns (tenant_id, context_id, role, content, at_us, size) VALUES (?,?,?,?,?,?)",
                [(tenant_id, context_id, int(m.role), m.content, now, len(m.content.encode())) for m in messages],
            )
            rows = tx.all("SELECT seq, role, size FROM turns WHERE tenant_id = ? AND context_id = ? ORDER BY seq",
                          (tenant_id, context_id))
            drop = self._over_bounds([(r["seq"], Role(r["role"]), r["size"]) for r in rows])
            if drop:
                tx.executemany("DELETE FROM turns WHERE seq = ?", [(seq,) for seq in drop])

        self._store.write(unit)

    async def aappend(self, tenant_id: str, context_id: str, messages: tuple[Message, ...]) -> None:
        """`append`, written on a worker thread."""
        await asyncio.to_thread(self.append, tenant_id, context_id, messages)

    def _over_bounds(self, rows: list[tuple[int, Role, int]]) -> list[int]:
        """Sequence numbers to delete so the context meets its bounds (the retention rule above)."""
        count, size = len(rows), sum(r[2] for r in rows)
        if count <= self._max_messages and size <= self._max_bytes:
            return []
        system = [r for r in rows if r[1] == Role.SYSTEM]
        groups: list[list[tuple[int, Role, int]]] = []
        for row in rows:
            if row[1] == Role.SYSTEM:
                continue
            if row[1] == Role.USER or not groups:
                groups.append([])
            groups[-1].append(row)
        drop: list[int] = []
        while (count > self._max_messages or size > self._max_bytes) and len(groups) > 1:
            group = groups.pop(0)
            drop.extend(r[0] for r in group)
            count -= len(group)
            size -= sum(r[2] for r in group)
        while (count > self._max_messages or size > self._max_bytes) and system:
            row = system.pop(0)
            drop.append(row[0])
            count -= 1
            size -= row[2]
        return drop

    def purge(self) -> int:
        """Delete every expired context; returns how many."""
        def unit(tx: Tx) -> int:
            expired = tx.all("SELECT tenant_id, context_id FROM turns GROUP BY tenant_id, context_id"
                             " HAVING MAX(at_us) < ?", (self._cutoff_us(),))
            if expired:
                tx.executemany("DELETE FROM turns WHERE tenant_id = ? AND context_id = ?",
                               [(r["tenant_id"], r["context_id"]) for r in expired])
            return len(expired)

        return self._store.write(unit)

    def close(self) -> None:
        self._store.close()


_FOR_UPDATE = {"sqlite": "", "postgres": " FOR UPDATE"}


def exchanges(history: tuple[Message, ...]) -> list[tuple[Message, ...]]:
    """Non-system history split into exchanges, each starting at a user turn."""
    groups: list[list[Message]] = []
    for message in history:
        if message.role == Role.SYSTEM:
            continue
        if message.role == Role.USER or not groups:
            groups.append([])
        groups[-1].append(message)
    return [tuple(g) for g in groups]


async def fit_to_window(
    history: tuple[Message, ...],
    new_turn: tuple[Message, ...],
    max_tokens: int,
    context_window: int,
    count: Callable[[tuple[Message, ...]], Awaitable[int]],
) -> tuple[tuple[Message, ...], int]:
    """The conversation to send (trimmed by the rule above) and its prompt token count."""
    system = tuple(m for m in [*history, *new_turn] if m.role == Role.SYSTEM)
    kept = exchanges(history)
    tail = tuple(m for m in new_turn if m.role != Role.SYSTEM)
    while True:
        messages = system + tuple(m for group in kept for m in group) + tail
        tokens = await count(messages)
        if not context_window or tokens + max_tokens <= context_window:
            return messages, tokens
        if not kept:
            raise InvalidInput(
                f"the prompt ({tokens} tokens) plus max_tokens ({max_tokens}) exceeds the model's context window"
                f" of {context_window} tokens",
                field="prompt",
            )
        kept.pop(0)
