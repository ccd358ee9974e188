"""The slowly-changing part of the ledger — prices and budgets — cached in memory per process.

Every price or budget change bumps `catalog_version` in the same transaction; a unit of work reads that
version once per transaction and reloads the cache when it moved, so several processes sharing one
PostgreSQL see each other's changes at their next transaction.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from typing import Any

from services.billing.model import (
    AutoLimit,
    Budget,
    Enforcement,
    Period,
    PeriodKind,
    Scope,
    ScopeKind,
    Thresholds,
)
from services.billing.store.base import Row, Tx
from services.common.pricing import Price, PriceTable

PRICE_COLUMNS = "price_id, model, model_version, input_micros, output_micros, cached_micros, effective_us, currency"
BUDGET_COLUMNS = (
    "budget_id, scope_kind, tenant_id, api_key_id, tag_key, tag_value, period_kind, rolling_days, time_zone, "
    "amount_micros, tokens, enforcement, warning_percent, critical_percent, emergency_percent, auto_json, "
    "webhook_url, create_us, update_us, generation"
)


def price_from_row(r: Row) -> Price:
    return Price(price_id=r[0], model=r[1], model_version=r[2], input_per_million=int(r[3]),
                 output_per_million=int(r[4]), cached_per_million=None if r[5] is None else int(r[5]),
                 effective_us=int(r[6]), currency=r[7])


def budget_from_row(r: Row) -> Budget:
    auto = AutoLimit(**json.loads(r[15])) if r[15] else None
    return Budget(
        budget_id=r[0], scope=Scope(ScopeKind(r[1]), r[2], r[3], r[4], r[5]),
        period=Period(PeriodKind(r[6]), int(r[7]), r[8]), amount_micros=int(r[9]), tokens=int(r[10]),
        enforcement=Enforcement(r[11]), thresholds=Thresholds(int(r[12]), int(r[13]), int(r[14])), auto=auto,
        webhook_url=r[16], create_us=int(r[17]), update_us=int(r[18]), generation=int(r[19]),
    )


def budget_to_row(b: Budget) -> tuple[Any, ...]:
    auto = json.dumps(b.auto.__dict__) if b.auto else None
    return (b.budget_id, int(b.scope.kind), b.scope.tenant_id, b.scope.api_key_id, b.scope.tag_key,
            b.scope.tag_value, int(b.period.kind), b.period.rolling_days, b.period.time_zone, b.amount_micros,
            b.tokens, int(b.enforcement), b.thresholds.warning, b.thresholds.critical, b.thresholds.emergency,
            auto, b.webhook_url, b.create_us, b.update_us, b.generation)


def bump_version(tx: Tx) -> None:
    tx.execute("UPDATE catalog_version SET version = version + 1 WHERE id = 1")
    tx.changed_catalog()


@dataclass
class Snapshot:
    version: int
    prices: PriceTable
    price_list: list[Price]
    budgets: dict[str, Budget]
    by_tenant: dict[str, list[Budget]] = field(default_factory=dict)

    def applicable(self, tenant_id: str, api_key_id: str, tags: dict[str, str]) -> list[Budget]:
        """Budgets that a request of this tenant / key / tags counts against, in id order."""
        found = []
        for budget in self.by_tenant.get(tenant_id, []) + (self.by_tenant.get("", []) if tenant_id else []):
            s = budget.scope
            if s.kind == ScopeKind.TENANT or (s.kind == ScopeKind.API_KEY and s.api_key_id == api_key_id) or (
                    s.kind == ScopeKind.TAG and tags.get(s.tag_key) == s.tag_value):
                found.append(budget)
        return sorted(found, key=lambda b: b.budget_id)


class Catalog:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._snapshot: Snapshot | None = None

    def current(self, tx: Tx) -> Snapshot:
        cached = tx.memo.get("catalog")
        if cached is not None:
            return cached  # type: ignore[no-any-return]
        row = tx.one("SELECT version FROM catalog_version WHERE id = 1")
        version = int(row[0]) if row else 0
        with self._lock:
            snapshot = self._snapshot
        if snapshot is None or snapshot.version != version:
            snapshot = self._load(tx, version)
            with self._lock:
                self._snapshot = snapshot
        tx.memo["catalog"] = snapshot
        return snapshot

    def cached_budget(self, budget_id: str) -> Budget | None:
        with self._lock:
            return self._snapshot.budgets.get(budget_id) if self._snapshot else None

    @staticmethod
    def _load(tx: Tx, version: int) -> Snapshot:
        prices = [price_from_row(r) for r in tx.all(f"SELECT {PRICE_COLUMNS} FROM prices")]
        budgets = {r[0]: budget_from_row(r) for r in tx.all(f"SELECT {BUDGET_COLUMNS} FROM budgets")}
        by_tenant: dict[str, list[Budget]] = {}
        for budget in budgets.values():
            by_tenant.setdefault(budget.scope.tenant_id, []).append(budget)
        return Snapshot(version, PriceTable(prices), prices, budgets, by_tenant)
