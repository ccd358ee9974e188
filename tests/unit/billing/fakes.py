"""Fakes for the billing domain unit tests: an in-memory ledger database and a hand-set clock."""

from __future__ import annotations

import sqlite3
from dataclasses import replace
from typing import Any

from services.billing import admin
from services.billing.alerts import FiredCache
from services.billing.book import Book
from services.billing.catalog import Catalog
from services.billing.ledger import Ingested, Ingester
from services.billing.model import Budget, Period, PeriodKind, Scope, ScopeKind, UsageEvent
from services.billing.store.migrations import migrate
from services.billing.store.sqlite_store import SqliteTx
from services.common.pricing import Price

US = 1_000_000
T0 = 1_767_225_600 * US  # 2026-01-01T00:00:00Z, a Thursday


class Ledger:
    """The domain modules over a throwaway in-memory database (with or without the writer's book)."""

    def __init__(self, with_book: bool = True) -> None:
        self.conn = sqlite3.connect(":memory:", isolation_level=None)
        self.tx = SqliteTx(self.conn, Book() if with_book else None)
        migrate(self.tx, 0)
        self.catalog = Catalog()
        self.fired = FiredCache()
        self.ingester = Ingester(self.catalog, self.fired, "USD")
        self.now = T0
        admin.create_price(self.tx, Price("p", "m", "", 1_000_000, 1_000_000, None, 1), "ops", 1)

    def budget(self, budget_id: str, *, micros: int = 0, tokens: int = 0, period: PeriodKind = PeriodKind.MONTHLY,
               scope: Scope | None = None, days: int = 0, create_us: int | None = None, **kw: Any) -> Budget:
        budget = Budget(budget_id, scope or Scope(ScopeKind.TENANT, "acme"), Period(period, days),
                        amount_micros=micros, tokens=tokens)
        return admin.create_budget(self.tx, replace(budget, **kw), "ops", self.now if create_us is None else create_us)

    def record(self, event_id: str, tokens: int, *, at: int | None = None, key: str = "k1",
               tags: dict[str, str] | None = None, model: str = "m") -> Ingested:
        """One event of `tokens` prompt tokens (1 micro-unit each at the test price)."""
        event = UsageEvent(event_id, "acme", key, model, tags=tags or {}, prompt_tokens=tokens,
                           end_us=self.now if at is None else at)
        return self.ingester.ingest(self.tx, [event], self.now)
