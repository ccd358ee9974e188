"""The audit log: every change to prices and budgets and every denied spend — who, when, what."""

from __future__ import annotations

import json
from typing import Any

from services.billing.model import AuditEvent
from services.billing.store.base import Tx
from services.common.errors import InvalidInput

MAX_PAGE = 1000


def record(tx: Tx, now_us: int, actor: str, action: str, target: str, details: dict[str, Any],
           claimed: str = "") -> None:
    """`actor` is who made the change as billing identified them; `claimed` is a name the caller gave itself
    (kept beside it as `claimed_actor`, never as the actor)."""
    if claimed and claimed != actor:
        details = {**details, "claimed_actor": claimed[:200]}
    tx.execute("INSERT INTO audit (time_us, actor, action, target, details_json) VALUES (?, ?, ?, ?, ?)",
               (now_us, actor or "anonymous", action, target, json.dumps(details, sort_keys=True, default=str)))


def list_events(tx: Tx, start_us: int, end_us: int, action: str, page_size: int,
                page_token: str) -> tuple[list[AuditEvent], str]:
    """Newest first; the page token is the sequence number of the last event returned."""
    if page_size < 0:
        raise InvalidInput("page_size cannot be negative", field="page_size")
    size = min(page_size or 100, MAX_PAGE)
    try:
        before = int(page_token) if page_token else 2**62
    except ValueError as exc:
        raise InvalidInput("page_token is not one this server issued; pass next_page_token unchanged",
                           field="page_token") from exc
    sql = "SELECT seq, time_us, actor, action, target, details_json FROM audit WHERE seq < ? AND time_us >= ?"
    params: list[Any] = [before, start_us]
    if end_us:
        sql += " AND time_us < ?"
        params.append(end_us)
    if action:
        sql += " AND action = ?"
        params.append(action)
    rows = tx.all(sql + " ORDER BY seq DESC LIMIT ?", [*params, size + 1])
    events = [AuditEvent(int(r[0]), int(r[1]), r[2], r[3], r[4], r[5]) for r in rows[:size]]
    token = str(events[-1].seq) if len(rows) > size else ""
    return events, token
