"""Engine-side metering: inference replicas' records of finished sequences, reconciled with routers' events.

Every replica reports each finished sequence (request id, caller, model, tokens, status) in batches
(ReportEngineUsage). A record is kept once per (request id, replica id) and reconciled by request id, the
id of the router's usage event:

- The router's event is authoritative. When it is in the ledger (before or after the record came), the
  record is MATCHED and nothing more happens.
- A record is due `grace` after the latest of: its end, its arrival, and the expiry of the router's leases
  open when it arrived (`router_id`; a router that holds a lease may still send its event until the lease
  runs out). A due record with no router event is BILLED: ingested as the event `request_id`, marked
  source ENGINE in the ledger. Of several records of one request (a retry on another replica before the
  first token), the one with the most completion tokens is billed; the others are SUPERSEDED.
- Never both: the ledger counts one event per id. A router event arriving after the engine's bill is a
  duplicate (its sender is answered with the engine bill's cost and stops retrying); the engine's counts
  stand and the late arrival is counted in `autoglm_billing_engine_records_total{outcome="late_router"}`.
- A record billing cannot price (no price for the model) is REJECTED when it falls due and logged.
- A record of a request billing refused a hold for (Reserve denied: the audit log's `spend.denied` names
  the request id) is REFUSED, never billed: the router started the generation while the hold was on its
  way and cancelled it when the hold was refused, so the caller was answered with the refusal.

Counting the grace from the record's arrival keeps a router's spooled events (replayed once billing is back
after an outage) ahead of the records its replicas buffered meanwhile.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

from services.billing.budgets import LEASE_OPEN
from services.billing.ledger import Ingested, Ingester
from services.billing.model import EngineRecord, Source, UsageEvent
from services.billing.store.base import Tx
from services.common.errors import DomainError
from services.common.generation import TrafficClass
from services.common.usage import UsageStatus

PENDING, MATCHED, BILLED, SUPERSEDED, REJECTED, REFUSED = 0, 1, 2, 3, 4, 5
# How long before a record's start a Reserve refusal of its request is looked for (the hold comes first).
REFUSAL_LOOKBACK_US = 300 * 1_000_000
CHUNK = 400
_COLUMNS = ("request_id, replica_id, tenant_id, api_key_id, model, model_version, tags_json, prompt_tokens,"
            " completion_tokens, status, traffic_class, start_us, end_us, router_id, trace_id, received_us, due_us,"
            " state")


@dataclass
class Reconciled:
    """What one reconciliation pass did, by request."""

    billed: list[str] = field(default_factory=list)
    matched: list[str] = field(default_factory=list)
    superseded: int = 0
    rejected: list[tuple[str, DomainError]] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)
    ingested: Ingested | None = None

    @property
    def requests(self) -> int:
        return len(self.billed) + len(self.matched) + len(self.rejected) + len(self.refused)


def _present(tx: Tx, event_ids: Sequence[str]) -> set[str]:
    found: set[str] = set()
    for start in range(0, len(event_ids), CHUNK):
        chunk = list(event_ids[start:start + CHUNK])
        marks = ", ".join("?" * len(chunk))
        found.update(str(r[0]) for r in tx.all(f"SELECT event_id FROM events WHERE event_id IN ({marks})", chunk))
    return found


def _lease_expiry(tx: Tx, router_ids: set[str], now_us: int) -> dict[str, int]:
    expiry: dict[str, int] = {}
    for router_id in sorted(router_ids):
        row = tx.one("SELECT MAX(expire_us) FROM leases WHERE router_id = ? AND state = ? AND expire_us > ?",
                     (router_id, LEASE_OPEN, now_us))
        if row is not None and row[0] is not None:
            expiry[router_id] = int(row[0])
    return expiry


def store(tx: Tx, records: Sequence[EngineRecord], now_us: int, grace_us: int) -> int:
    """Keep these records (a repeat of (request id, replica id) is ignored); returns how many were new."""
    if not records:
        return 0
    present = _present(tx, sorted({r.request_id for r in records}))
    leases = _lease_expiry(tx, {r.router_id for r in records if r.router_id}, now_us)
    new = 0
    for r in records:
        due = max(r.end_us, now_us, leases.get(r.router_id, 0)) + grace_us
        state = MATCHED if r.request_id in present else PENDING
        new += tx.execute(
            f"INSERT INTO engine_records ({_COLUMNS}) VALUES ({', '.join('?' * 18)})"
            " ON CONFLICT (request_id, replica_id) DO NOTHING",
            (r.request_id, r.replica_id, r.tenant_id, r.api_key_id, r.model, r.model_version,
             json.dumps(r.tags, sort_keys=True) if r.tags else "{}", r.prompt_tokens, r.completion_tokens,
             int(r.status), int(r.traffic_class), r.start_us, r.end_us, r.router_id, r.trace_id, now_us, due, state))
    return new


def _record(row: Sequence[object]) -> EngineRecord:
    (request_id, replica_id, tenant_id, api_key_id, model, version, tags_json, prompt, completion, status,
     traffic, start_us, end_us, router_id, trace_id) = row[:15]
    return EngineRecord(str(request_id), str(replica_id), str(tenant_id), str(api_key_id), str(model), str(version),
                        json.loads(str(tags_json)), int(prompt), int(completion),  # type: ignore[call-overload]
                        UsageStatus(int(status)), TrafficClass(int(traffic)),  # type: ignore[call-overload]
                        int(start_us), int(end_us), str(router_id), str(trace_id))  # type: ignore[call-overload]


def event_of(record: EngineRecord) -> UsageEvent:
    """The usage event an engine record is billed as: the router's event id (the request id)."""
    return UsageEvent(event_id=record.request_id, tenant_id=record.tenant_id, api_key_id=record.api_key_id,
                      model=record.model, model_version=record.model_version, tags=record.tags,
                      prompt_tokens=record.prompt_tokens, completion_tokens=record.completion_tokens,
                      request_id=record.request_id, trace_id=record.trace_id, start_us=record.start_us,
                      end_us=record.end_us, status=record.status, traffic_class=record.traffic_class,
                      source=Source.ENGINE)


def reconcile(tx: Tx, ingester: Ingester, now_us: int, limit: int = 1000) -> Reconciled:
    """Settle the due records: matched when the router's event came, else billed from the best record."""
    due = [str(r[0]) for r in tx.all("SELECT DISTINCT request_id FROM engine_records WHERE state = ? AND due_us <= ?"
                                     " ORDER BY request_id LIMIT ?", (PENDING, now_us, limit))]
    result = Reconciled()
    if not due:
        return result
    pending: dict[str, list[EngineRecord]] = defaultdict(list)
    for start in range(0, len(due), CHUNK):
        chunk = due[start:start + CHUNK]
        marks = ", ".join("?" * len(chunk))
        for row in tx.all(f"SELECT {_COLUMNS} FROM engine_records WHERE state = ? AND request_id IN ({marks})",
                          [PENDING, *chunk]):
            pending[str(row[0])].append(_record(row))
    present = _present(tx, due)
    unmatched = [request_id for request_id in due if request_id not in present]
    since = min((r.start_us or r.end_us for request_id in unmatched for r in pending[request_id]), default=now_us)
    denied = _refused(tx, set(unmatched), since - REFUSAL_LOOKBACK_US)
    chosen: list[EngineRecord] = []
    for request_id in due:
        if request_id in present:
            result.matched.append(request_id)
            continue
        if request_id in denied:
            result.refused.append(request_id)
            continue
        records = pending[request_id]
        chosen.append(max(records, key=lambda r: (r.completion_tokens, r.end_us, r.replica_id)))
        result.superseded += len(records) - 1
    states: list[tuple[int, str, str]] = [(MATCHED, request_id, "") for request_id in result.matched]
    states += [(REFUSED, request_id, "") for request_id in result.refused]
    if chosen:
        ingested = ingester.ingest(tx, [event_of(r) for r in chosen], now_us)
        result.ingested = ingested
        billed: list[str] = []
        for record, outcome in zip(chosen, ingested.outcomes, strict=True):
            if isinstance(outcome, DomainError):
                result.rejected.append((record.request_id, outcome))
                states.append((REJECTED, record.request_id, ""))
            elif outcome.duplicate:  # an event of this id came in the same transaction's view: the router's
                result.matched.append(record.request_id)
                states.append((MATCHED, record.request_id, ""))
            else:
                billed.append(record.request_id)
                states.append((BILLED, record.request_id, record.replica_id))
        result.billed = billed
        for start in range(0, len(billed), CHUNK):
            chunk = billed[start:start + CHUNK]
            tx.execute(f"UPDATE events SET source = ? WHERE event_id IN ({', '.join('?' * len(chunk))})",
                       [int(Source.ENGINE), *chunk])
    for state, request_id, replica_id in states:
        if state == BILLED:
            tx.execute("UPDATE engine_records SET state = CASE WHEN replica_id = ? THEN ? ELSE ? END"
                       " WHERE request_id = ? AND state = ?", (replica_id, BILLED, SUPERSEDED, request_id, PENDING))
        else:
            tx.execute("UPDATE engine_records SET state = ? WHERE request_id = ? AND state = ?",
                       (state, request_id, PENDING))
    return result


def _refused(tx: Tx, request_ids: set[str], since_us: int) -> set[str]:
    """Which of these requests billing refused a hold for (Reserve denied) since `since_us`."""
    if not request_ids:
        return set()
    found: set[str] = set()
    for (details,) in tx.all("SELECT details_json FROM audit WHERE action = 'spend.denied' AND time_us >= ?",
                             (since_us,)):
        request_id = json.loads(str(details)).get("request_id", "")
        if request_id in request_ids:
            found.add(request_id)
    return found


def billed_by_engine(tx: Tx, event_ids: Sequence[str]) -> set[str]:
    """Which of these event ids the ledger holds as engine bills."""
    found: set[str] = set()
    for start in range(0, len(event_ids), CHUNK):
        chunk = list(event_ids[start:start + CHUNK])
        marks = ", ".join("?" * len(chunk))
        found.update(str(r[0]) for r in tx.all(
            f"SELECT event_id FROM events WHERE source = ? AND event_id IN ({marks})", [int(Source.ENGINE), *chunk]))
    return found


def records(tx: Tx, request_id: str) -> list[tuple[EngineRecord, int]]:
    """The records of one request with their states (for reports and tests)."""
    return [(_record(row), int(row[17])) for row in tx.all(
        f"SELECT {_COLUMNS} FROM engine_records WHERE request_id = ? ORDER BY replica_id", (request_id,))]


def purge(tx: Tx, before_us: int) -> int:
    """Drop settled records that arrived before `before_us` (pending ones stay until reconciled)."""
    return tx.execute("DELETE FROM engine_records WHERE state <> ? AND received_us < ?", (PENDING, before_us))
