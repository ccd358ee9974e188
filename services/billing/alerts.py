"""Alert levels: each fires exactly once per budget, period and limit generation.

A unique key (budget, period start, generation, level) in the alerts table makes firing idempotent even
across processes; raising a budget's limit bumps its generation, which re-arms the levels; a new period
has a new start, which re-arms them too. An alert's cursor is its sequence number in that table, so a
watcher that resumes from the last cursor it saw misses none and sees none twice.
"""

from __future__ import annotations

import asyncio
import json
import threading
from dataclasses import replace

from services.billing.model import Alert, Budget, BudgetState, Firing, Scope, ScopeKind
from services.billing.store.base import Row, Tx
from services.common.errors import InvalidInput
from services.common.usage import AlertLevel

ALERT_COLUMNS = "seq, budget_id, tenant_id, scope_json, level, period_start_us, permille, raise_us"


class FiredCache:
    """Keys already known to be in the table, so a busy budget does not re-insert them per event."""

    def __init__(self) -> None:
        self._keys: set[tuple[str, int, int, int]] = set()
        self._lock = threading.Lock()

    def __contains__(self, key: tuple[str, int, int, int]) -> bool:
        with self._lock:
            return key in self._keys

    def add(self, key: tuple[str, int, int, int]) -> None:
        with self._lock:
            if len(self._keys) > 100_000:
                self._keys.clear()
            self._keys.add(key)


def fire(tx: Tx, fired: FiredCache, budget: Budget, period_start_us: int, level: AlertLevel, permille: int,
         now_us: int) -> list[Alert]:
    """Insert every level up to `level` not yet raised in this period; returns the new alerts in order."""
    raised = []
    scope_json = json.dumps(budget.scope.__dict__ | {"kind": int(budget.scope.kind)})
    for lvl in range(AlertLevel.WARNING, level + 1):
        key = (budget.budget_id, period_start_us, budget.generation, lvl)
        if key in fired:
            continue
        row = tx.one(
            "INSERT INTO alerts (budget_id, tenant_id, scope_json, level, period_start_us, generation, permille,"
            " raise_us) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
            " ON CONFLICT (budget_id, period_start_us, generation, level) DO NOTHING RETURNING seq",
            (budget.budget_id, budget.scope.tenant_id, scope_json, lvl, period_start_us, budget.generation,
             permille, now_us))
        if row is None:
            fired.add(key)
            continue
        raised.append(Alert(int(row[0]), budget.budget_id, budget.scope, budget.scope.tenant_id, AlertLevel(lvl),
                            period_start_us, permille, now_us))
    return raised


def _alert(r: Row) -> Alert:
    scope = json.loads(r[3])
    scope["kind"] = ScopeKind(scope["kind"])
    return Alert(int(r[0]), r[1], Scope(**scope), r[2], AlertLevel(r[4]), int(r[5]), int(r[6]), int(r[7]))


def parse_cursor(cursor: str) -> int:
    try:
        value = int(cursor)
    except ValueError as exc:
        raise InvalidInput(f"cursor {cursor[:40]!r} is not one this server issued; pass an alert's cursor back "
                           "unchanged, or none to start from now", field="cursor") from exc
    if value < 0:
        raise InvalidInput("cursor cannot be negative", field="cursor")
    return value


def after(tx: Tx, cursor: int, tenant_id: str, limit: int = 500) -> list[Alert]:
    sql = f"SELECT {ALERT_COLUMNS} FROM alerts WHERE seq > ?"
    params: list[object] = [cursor]
    if tenant_id:
        sql += " AND tenant_id = ?"
        params.append(tenant_id)
    return [_alert(r) for r in tx.all(sql + " ORDER BY seq LIMIT ?", [*params, limit])]


def with_fired(tx: Tx, state: BudgetState) -> BudgetState:
    """`state` with the alert levels its budget fired in its period, oldest first."""
    rows = tx.all("SELECT level, raise_us, permille FROM alerts WHERE budget_id = ? AND period_start_us = ?"
                  " ORDER BY seq", (state.budget.budget_id, state.period_start_us))
    return replace(state, fired=tuple(Firing(AlertLevel(r[0]), int(r[1]), int(r[2])) for r in rows))


def last_seq(tx: Tx) -> int:
    row = tx.one("SELECT MAX(seq) FROM alerts")
    return int(row[0]) if row and row[0] is not None else 0


class AlertHub:
    """Wakes watchers when this process commits alerts (other processes' alerts are found by polling)."""

    def __init__(self) -> None:
        self.version = 0
        self._changed = asyncio.Event()

    def notify(self) -> None:
        self.version += 1
        self._changed.set()
        self._changed = asyncio.Event()

    async def wait(self, seen_version: int, timeout: float) -> None:
        if self.version != seen_version:
            return
        try:
            await asyncio.wait_for(self._changed.wait(), timeout)
        except TimeoutError:
            pass
