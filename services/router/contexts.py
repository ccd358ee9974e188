"""`context_id` conversations: turns stored durably in SQLite per tenant, replayed on the next turn.

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

import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from services.common.errors import InvalidInput
from services.router.sqlite_util import connect
from services.router.types import Message, Role

MAX_CONTEXT_ID = 128
DEFAULT_MAX_MESSAGES = 200
DEFAULT_MAX_BYTES = 1024 * 1024
DEFAULT_RETENTION_S = 30 * 86400.0


class ContextStore:
    def __init__(
        self,
        path: Path,
        max_messages: int = DEFAULT_MAX_MESSAGES,
        max_bytes: int = DEFAULT_MAX_BYTES,
        retention_s: float = DEFAULT_RETENTION_S,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._max_messages = max_messages
        self._max_bytes = max_bytes
        self._retention_s = retention_s
        self._clock = clock
        self._conn = connect(path)
        self._conn.execute(
            "CREATE TABLE IF NOT EXISTS turns (tenant_id TEXT, context_id TEXT, seq INTEGER PRIMARY KEY AUTOINCREMENT,"
            " role INTEGER, content TEXT)"
        )
        columns = {row["name"] for row in self._conn.execute("PRAGMA table_info(turns)")}
        if "at_us" not in columns:  # a store from before retention: its turns count as written now
            self._conn.execute("ALTER TABLE turns ADD COLUMN at_us INTEGER NOT NULL DEFAULT 0")
            self._conn.execute("UPDATE turns SET at_us = ?", (self._now_us(),))
        if "size" not in columns:
            self._conn.execute("ALTER TABLE turns ADD COLUMN size INTEGER NOT NULL DEFAULT 0")
            self._conn.execute("UPDATE turns SET size = length(CAST(content AS BLOB))")
        self._conn.execute("CREATE INDEX IF NOT EXISTS turns_ctx ON turns(tenant_id, context_id, seq)")
        self._lock = threading.Lock()

    @staticmethod
    def validate(context_id: str) -> None:
        if len(context_id) > MAX_CONTEXT_ID:
            raise InvalidInput(f"context_id is at most {MAX_CONTEXT_ID} characters", field="context_id")

    def _now_us(self) -> int:
        return int(self._clock() * 1_000_000)

    def _cutoff_us(self) -> int:
        return int((self._clock() - self._retention_s) * 1_000_000)

    def history(self, tenant_id: str, context_id: str) -> tuple[Message, ...]:
        with self._lock:
            rows = self._conn.execute(
                "SELECT role, content, at_us FROM turns WHERE tenant_id = ? AND context_id = ? ORDER BY seq",
                (tenant_id, context_id),
            ).fetchall()
        if not rows or rows[-1]["at_us"] < self._cutoff_us():
            return ()  # none, or expired (purge deletes it)
        return tuple(Message(Role(r["role"]), r["content"]) for r in rows)

    def append(self, tenant_id: str, context_id: str, messages: tuple[Message, ...]) -> None:
        """Store a finished turn, then trim the context by the retention rule above."""
        now = self._now_us()
        with self._lock:
            self._conn.execute("BEGIN")
            try:
                last = self._conn.execute("SELECT MAX(at_us) AS last FROM turns WHERE tenant_id = ? AND context_id = ?",
                                          (tenant_id, context_id)).fetchone()["last"]
                if last is not None and last < self._cutoff_us():
                    # an expired context starts afresh: its old turns must not come back with this one
                    self._conn.execute("DELETE FROM turns WHERE tenant_id = ? AND context_id = ?",
                                       (tenant_id, context_id))
                self._conn.executemany(
                    "INSERT INTO turns (tenant_id, context_id, role, content, at_us, size) VALUES (?,?,?,?,?,?)",
                    [(tenant_id, context_id, int(m.role), m.content, now, len(m.content.encode())) for m in messages],
                )
                rows = self._conn.execute(
                    "SELECT seq, role, size FROM turns WHERE tenant_id = ? AND context_id = ? ORDER BY seq",
                    (tenant_id, context_id)).fetchall()
                drop = self._over_bounds([(r["seq"], Role(r["role"]), r["size"]) for r in rows])
                self._conn.executemany("DELETE FROM turns WHERE seq = ?", [(seq,) for seq in drop])
                self._conn.execute("COMMIT")
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise

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
        with self._lock:
            expired = self._conn.execute(
                "SELECT tenant_id, context_id FROM turns GROUP BY tenant_id, context_id HAVING MAX(at_us) < ?",
                (self._cutoff_us(),)).fetchall()
            self._conn.execute("BEGIN")
            self._conn.executemany("DELETE FROM turns WHERE tenant_id = ? AND context_id = ?",
                                   [(r["tenant_id"], r["context_id"]) for r in expired])
            self._conn.execute("COMMIT")
        return len(expired)

    def close(self) -> None:
        self._conn.close()


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
