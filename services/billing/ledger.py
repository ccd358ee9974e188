"""Idempotent ingestion of usage events: priced at the event's time, counted once per event id, forever.

The event row and its effect on budgets are written in the same transaction, so a crash leaves either
both or neither. A repeated event id returns the first result and writes nothing. Priced with the price in
force at the event's end time (see `pricing` for the rounding rule); a cancelled request is billed for the
tokens it reports.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from services.billing import budgets, pricing
from services.billing.alerts import FiredCache
from services.billing.catalog import Catalog
from services.billing.model import Alert, Level, Recorded, UsageEvent
from services.billing.store.base import Tx
from services.common.errors import DomainError


@dataclass(frozen=True)
class Ingested:
    recorded: Recorded
    alerts: list[Alert] = field(default_factory=list)


def previous(tx: Tx, event_id: str) -> Recorded | None:
    row = tx.one("SELECT cost_micros FROM events WHERE event_id = ?", (event_id,))
    return Recorded(event_id, int(row[0]), duplicate=True) if row else None


def ingest(tx: Tx, catalog: Catalog, fired: FiredCache, event: UsageEvent, currency: str, now_us: int) -> Ingested:
    snap = catalog.current(tx)
    try:
        price = snap.prices.require(event.model, event.model_version, event.end_us)
    except DomainError:
        seen = previous(tx, event.event_id)  # a retry of an event recorded before the price changed
        if seen is not None:
            return Ingested(seen)
        raise
    cost = pricing.cost_micros(price, event.prompt_tokens, event.completion_tokens, event.cached)
    # Budgets are locked before the event row is inserted, everywhere, so that no two transactions can each
    # hold one and wait for the other (PostgreSQL; a no-op on SQLite).
    tx.lock_budgets([b.budget_id for b in snap.applicable(event.tenant_id, event.api_key_id, event.tags)])
    row = tx.one(
        "INSERT INTO events (event_id, tenant_id, api_key_id, model, model_version, tags_json, prompt_tokens,"
        " completion_tokens, cached, request_id, trace_id, start_us, end_us, status, traffic_class, cost_micros,"
        " currency, recorded_us) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
        " ON CONFLICT (event_id) DO NOTHING RETURNING seq",
        (event.event_id, event.tenant_id, event.api_key_id, event.model, event.model_version,
         json.dumps(event.tags, sort_keys=True), event.prompt_tokens, event.completion_tokens, int(event.cached),
         event.request_id, event.trace_id, event.start_us, event.end_us, int(event.status),
         int(event.traffic_class), cost, currency, now_us))
    if row is None:
        seen = previous(tx, event.event_id)
        assert seen is not None
        return Ingested(seen)
    level, raised = budgets.add_spend(tx, snap, fired, event, cost, now_us)
    return Ingested(Recorded(event.event_id, cost, duplicate=False, level=level), raised)


def lock_all(tx: Tx, catalog: Catalog, events: list[UsageEvent]) -> None:
    """Lock, in one go and in id order, every budget a batch of events will touch."""
    snap = catalog.current(tx)
    ids = {b.budget_id for e in events for b in snap.applicable(e.tenant_id, e.api_key_id, e.tags)}
    tx.lock_budgets(sorted(ids))


def totals(tx: Tx) -> tuple[int, int, int, int]:
    """(events, prompt tokens, completion tokens, cost) over the whole ledger."""
    row = tx.one("SELECT COUNT(*), COALESCE(SUM(prompt_tokens), 0), COALESCE(SUM(completion_tokens), 0),"
                 " COALESCE(SUM(cost_micros), 0) FROM events")
    assert row is not None
    return int(row[0]), int(row[1]), int(row[2]), int(row[3])


__all__ = ["Ingested", "Level", "ingest", "totals"]
