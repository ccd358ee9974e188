"""`context_id` conversations: turns stored durably in SQLite per tenant, replayed on the next turn.

Trimming rule (when the replayed conversation plus max_tokens does not fit the model's context window):
system messages are always kept; the oldest whole exchanges (a user turn and the answers that followed
it) are dropped first, one at a time, until it fits. The new turn itself is never dropped; if it alone
does not fit, the request fails with INVALID_ARGUMENT.
"""

from __future__ import annotations

import threading
from collections.abc import Awaitable, Callable
from pathlib import Path

from services.common.errors import InvalidInput
from services.router.sqlite_util import connect
from services.router.types import Message, Role

MAX_CONTEXT_ID = 128


class ContextStore:
    def __init__(self, path: Path) -> None:
        self._conn = connect(path)
        self._conn.execute(
            "CREATE TABLE IF NOT EXISTS turns (tenant_id TEXT, context_id TEXT, seq INTEGER PRIMARY KEY AUTOINCREMENT,"
            " role INTEGER, content TEXT)"
        )
        self._conn.execute("CREATE INDEX IF NOT EXISTS turns_ctx ON turns(tenant_id, context_id, seq)")
        self._lock = threading.Lock()

    @staticmethod
    def validate(context_id: str) -> None:
        if len(context_id) > MAX_CONTEXT_ID:
            raise InvalidInput(f"context_id is at most {MAX_CONTEXT_ID} characters", field="context_id")

    def history(self, tenant_id: str, context_id: str) -> tuple[Message, ...]:
        with self._lock:
            rows = self._conn.execute(
                "SELECT role, content FROM turns WHERE tenant_id = ? AND context_id = ? ORDER BY seq",
                (tenant_id, context_id),
            ).fetchall()
        return tuple(Message(Role(r["role"]), r["content"]) for r in rows)

    def append(self, tenant_id: str, context_id: str, messages: tuple[Message, ...]) -> None:
        with self._lock:
            self._conn.execute("BEGIN")
            self._conn.executemany(
                "INSERT INTO turns (tenant_id, context_id, role, content) VALUES (?,?,?,?)",
                [(tenant_id, context_id, int(m.role), m.content) for m in messages],
            )
            self._conn.execute("COMMIT")

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
