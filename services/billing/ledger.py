"""Idempotent ingestion of usage events: priced at the event's time, counted once per event id, forever.

The event row and its effect on budgets are written in the same transaction, so a crash leaves either
both or neither. A repeated event id returns the first result and writes nothing. Priced with the price in
force at the event's end time, through the mesh's one price table and cost formula
(`services.common.pricing`, which the router quotes with); a cancelled request is billed for the tokens it
reports. An event that names the leases it was admitted against moves its cost from their room to committed
spend in the same commit (`leases.record_usage`). The hourly rollups are rolled forward from the event rows
afterwards (`rollups.roll`); reports add the events not rolled yet, so they see exactly the committed events.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from services.billing import budgets, leases, periods, rollups
from services.billing.alerts import FiredCache
from services.billing.catalog import Catalog, Snapshot
from services.billing.model import Alert, Budget, BudgetState, Recorded, UsageEvent
from services.billing.store.base import Tx
from services.common.errors import DomainError
from services.common.pricing import cost_micros
from services.common.usage import AlertLevel

EVENT_COLUMNS = ("event_id, tenant_id, api_key_id, model, model_version, tags_json, prompt_tokens, completion_tokens,"
                 " cached, request_id, trace_id, start_us, end_us, status, traffic_class, cost_micros, currency,"
                 " recorded_us, source")
ROWS_PER_INSERT = 400  # 19 parameters a row: well under SQLite's and PostgreSQL's parameter limits


@dataclass
class Ingested:
    """A batch's outcome, in the order of its events, and what it changed (for alerts and metrics)."""

    outcomes: list[Recorded | DomainError]
    alerts: list[Alert] = field(default_factory=list)
    states: list[BudgetState] = field(default_factory=list)
    new: list[tuple[UsageEvent, int]] = field(default_factory=list)  # (event, cost) of each first-time event

    def single(self) -> Recorded:
        """The one event's result; its DomainError is raised."""
        outcome = self.outcomes[0]
        if isinstance(outcome, DomainError):
            raise outcome
        return outcome


class Ingester:
    """Set-based ingestion of a batch of events in the caller's transaction.

    Per batch: prices come from the in-memory table (memoised per model and effective-time interval;
    the price the router quoted when it was in force within the quote grace, `PriceTable.charged`);
    every budget touched is locked once, in id order; the events are inserted with multi-row
    `INSERT ... ON CONFLICT (event_id) DO NOTHING RETURNING event_id` in id order (so concurrent batches
    that share ids wait for each other instead of deadlocking); the ids it did not return were recorded
    before and answer with their first result; spend is summed per budget bucket in Python and written
    with one upsert per bucket. A repeat of an id inside the batch answers with the first occurrence.
    """

    def __init__(self, catalog: Catalog, fired: FiredCache, currency: str, quote_grace_us: int = 15_000_000) -> None:
        self.catalog = catalog
        self.quote_grace_us = quote_grace_us
        self.fired = fired
        self.currency = currency
        self.buckets = periods.BucketCache()

    def ingest(self, tx: Tx, events: Sequence[UsageEvent], now_us: int) -> Ingested:
        snap = self.catalog.current(tx)
        outcomes: list[Recorded | DomainError | None] = [None] * len(events)
        first: dict[str, int] = {}
        priced: list[tuple[int, int]] = []  # (index, cost)
        unpriced: list[int] = []
        for index, event in enumerate(events):
            if event.event_id in first:
                continue
            first[event.event_id] = index
            price = snap.prices.charged(event.model, event.model_version, event.end_us, event.quoted_price_id,
                                        self.quote_grace_us)
            if price is None:
                unpriced.append(index)
            else:
                priced.append((index, cost_micros(price, event.prompt_tokens, event.completion_tokens,
                                                          event.cached)))
        applicable = _ApplicableCache(snap)
        rollups.hold_off_roll(tx)  # first: it may wait for a roll, which waits for no budget
        tx.lock_budgets(sorted({b.budget_id for i, _ in priced for b in applicable(events[i])}))
        inserted = self._insert(tx, events, sorted(priced, key=lambda p: events[p[0]].event_id), now_us)
        seen = previous(tx, [events[i].event_id for i, _ in priced if events[i].event_id not in inserted]
                        + [events[i].event_id for i in unpriced])
        result = Ingested([])
        deltas: dict[tuple[str, int], budgets.SpendDelta] = {}
        for index, cost in priced:
            event = events[index]
            if event.event_id not in inserted:
                outcomes[index] = Recorded(event.event_id, seen[event.event_id], duplicate=True)
                continue
            result.new.append((event, cost))
            for budget in applicable(event):
                bucket = self.buckets.start(budget.period, event.end_us)
                delta = deltas.get((budget.budget_id, bucket))
                if delta is None:
                    delta = deltas[(budget.budget_id, bucket)] = budgets.SpendDelta(budget, bucket)
                delta.micros += cost
                delta.tokens += event.tokens
                delta.last_us = max(delta.last_us, event.end_us)
        for index in unpriced:
            event = events[index]
            if event.event_id in seen:  # a retry of an event recorded before its price changed
                outcomes[index] = Recorded(event.event_id, seen[event.event_id], duplicate=True)
                continue
            try:
                snap.prices.require(event.model, event.model_version, event.end_us)
            except DomainError as error:
                outcomes[index] = error
        spend = budgets.add_spend(tx, self.fired, list(deltas.values()), now_us)
        leases.record_usage(tx, [(lease_id, frozenset(b.budget_id for b in applicable(event)), cost, event.tokens)
                                 for event, cost in result.new for lease_id in event.lease_ids])
        result.alerts, result.states = spend.alerts, spend.states
        for event, cost in result.new:
            level = max((spend.levels[(b.budget_id, self.buckets.start(b.period, event.end_us))]
                         for b in applicable(event)), default=AlertLevel.NONE)
            outcomes[first[event.event_id]] = Recorded(event.event_id, cost, duplicate=False, level=level)
        for index, event in enumerate(events):
            if outcomes[index] is None:  # a repeat inside the batch: the first occurrence's result
                original = outcomes[first[event.event_id]]
                outcomes[index] = original if isinstance(original, DomainError) else \
                    Recorded(event.event_id, original.cost_micros, duplicate=True)  # type: ignore[union-attr]
        result.outcomes = [o for o in outcomes if o is not None]
        return result

    def _insert(self, tx: Tx, events: Sequence[UsageEvent], rows: list[tuple[int, int]], now_us: int) -> set[str]:
        inserted: set[str] = set()
        for chunk_start in range(0, len(rows), ROWS_PER_INSERT):
            chunk = rows[chunk_start:chunk_start + ROWS_PER_INSERT]
            params: list[object] = []
            for index, cost in chunk:
                e = events[index]
                params += (e.event_id, e.tenant_id, e.api_key_id, e.model, e.model_version,
                           rollups.tags_json(e.tags), e.prompt_tokens,
                           e.completion_tokens, int(e.cached), e.request_id, e.trace_id, e.start_us, e.end_us,
                           int(e.status), int(e.traffic_class), cost, self.currency, now_us, int(e.source))
            values = ", ".join([_ROW_MARKS] * len(chunk))
            inserted.update(r[0] for r in tx.all(f"INSERT INTO events ({EVENT_COLUMNS}) VALUES {values}"
                                                 " ON CONFLICT (event_id) DO NOTHING RETURNING event_id", params))
        return inserted


_ROW_MARKS = "(" + ", ".join("?" * 19) + ")"


class _ApplicableCache:
    """The budgets an event counts against, computed once per (tenant, key, tags) in a batch."""

    def __init__(self, snap: Snapshot) -> None:
        self.snap = snap
        self._memo: dict[tuple[str, str, tuple[tuple[str, str], ...]], list[Budget]] = {}

    def __call__(self, event: UsageEvent) -> list[Budget]:
        key = (event.tenant_id, event.api_key_id, tuple(sorted(event.tags.items())) if event.tags else ())
        found = self._memo.get(key)
        if found is None:
            found = self._memo[key] = self.snap.applicable(event.tenant_id, event.api_key_id, event.tags)
        return found


def previous(tx: Tx, event_ids: list[str]) -> dict[str, int]:
    """The recorded cost of each of these ids that is already in the ledger."""
    found: dict[str, int] = {}
    for start in range(0, len(event_ids), ROWS_PER_INSERT):
        chunk = event_ids[start:start + ROWS_PER_INSERT]
        marks = ", ".join("?" * len(chunk))
        for event_id, cost in tx.all(f"SELECT event_id, cost_micros FROM events WHERE event_id IN ({marks})", chunk):
            found[event_id] = int(cost)
    return found


def totals(tx: Tx) -> tuple[int, int, int, int]:
    """(events, prompt tokens, completion tokens, cost) over the whole ledger."""
    row = tx.one("SELECT COUNT(*), COALESCE(SUM(prompt_tokens), 0), COALESCE(SUM(completion_tokens), 0),"
                 " COALESCE(SUM(cost_micros), 0) FROM events")
    assert row is not None
    return int(row[0]), int(row[1]), int(row[2]), int(row[3])


__all__ = ["Ingested", "Ingester", "totals"]
