"""Budget state, spend accounting, holds and the spend verdict (transactional functions over a `Tx`).

Levels come from spend alone (holds are not spend). The verdict, for HARD budgets only (SOFT budgets only
alert):
- CheckBudget answers with the level policy only (what may start: batch jobs pause at CRITICAL);
- a hold is refused when spend + open holds + routers' outstanding leases (`leases`) + the hold would pass
  the limit (every traffic class);
- at CRITICAL (>= 100 % by default) BATCH traffic is refused; at EMERGENCY (>= 120 %) everything but CORE.
Callers that do not name a traffic class count as INTERACTIVE.

Where Reserve decides, and why its answer waits for a durable commit:
- SQLite: in memory. The writer's book (`book.Book`) holds each budget's period spend and open holds, so
  the check of spend + holds + the new hold reads no table; the hold rows are then written in the same unit
  and committed with whatever else the writer batched at that moment (one fsync for the whole group).
- PostgreSQL: from the budget rows locked `FOR UPDATE` (several processes may share the database).
- The reply is sent only after that commit. Acknowledging a hold before it is durable would NOT be safe,
  although "a hold lost in a crash only frees budget" sounds harmless: the caller that received the lost
  hold still runs its request and spends up to the held amount, while the restarted ledger has already
  handed that same headroom to other callers — spend would end above the limit by up to the lost holds.
  So the fsync stays on Reserve's path; group commit amortises it across concurrent callers.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass

from services.billing import alerts, audit, periods, rollups
from services.billing.catalog import Snapshot
from services.billing.model import (
    Alert,
    Budget,
    BudgetState,
    Enforcement,
    Hold,
    PeriodKind,
    ReserveRequest,
    Verdict,
)
from services.billing.store.base import Tx
from services.common.errors import FailedPrecondition, NotFound
from services.common.generation import TrafficClass
from services.common.usage import AlertLevel

OPEN, SETTLED, RELEASED = 0, 1, 2
LEASE_OPEN, LEASE_RETURNED = 0, 1
_LEASE_ROOM = "CASE WHEN granted > used THEN granted - used ELSE 0 END"


@dataclass(frozen=True)
class Denied:
    reason: str
    budget_id: str
    level: AlertLevel


def auto_limit(tx: Tx, budget: Budget, at_us: int) -> tuple[int, int]:
    """Mean spend of the last K periods (since the budget exists) x factor; the floor without history."""
    assert budget.auto is not None
    auto = budget.auto
    created = periods.bucket_start(budget.period, budget.create_us)
    starts = [s for s in periods.previous_starts(budget.period, at_us, auto.lookback_periods) if s >= created]
    if not starts:
        return auto.floor_micros, auto.floor_tokens
    marks = ",".join("?" * len(starts))
    row = tx.one(f"SELECT COALESCE(SUM(spent_micros), 0), COALESCE(SUM(spent_tokens), 0) FROM budget_usage"
                 f" WHERE budget_id = ? AND bucket_us IN ({marks})", (budget.budget_id, *starts))
    micros, tokens = (int(row[0]), int(row[1])) if row else (0, 0)
    n = len(starts)
    return micros * auto.factor_permille // (1000 * n), tokens * auto.factor_permille // (1000 * n)


def effective_limit(tx: Tx, budget: Budget, at_us: int) -> tuple[int, int]:
    if budget.auto is None:
        return budget.amount_micros, budget.tokens
    bucket = periods.bucket_start(budget.period, at_us)
    row = tx.one("SELECT limit_micros, limit_tokens FROM budget_usage WHERE budget_id = ? AND bucket_us = ?",
                 (budget.budget_id, bucket))
    return (int(row[0]), int(row[1])) if row else auto_limit(tx, budget, at_us)


def leased(tx: Tx, budget_id: str, now_us: int) -> int:
    """Room of the budget's router leases that have not expired at `now_us` (see `leases`)."""
    row = tx.one(f"SELECT COALESCE(SUM({_LEASE_ROOM}), 0) FROM leases WHERE budget_id = ? AND expire_us > ?",
                 (budget_id, now_us))
    return int(row[0]) if row else 0


_BOUNDS = periods.BoundsCache()  # shared by the writer and the readers: a race only recomputes


def state(tx: Tx, budget: Budget, at_us: int, now_us: int, *, with_holds: bool = True) -> BudgetState:
    start, end = _BOUNDS.bounds(budget.period, at_us)
    book = tx.book
    if book is not None:
        spent_micros, spent_tokens = book.spent(tx, budget.budget_id, start, end)
    else:
        if budget.period.kind == PeriodKind.ROLLING_DAYS:
            row = tx.one("SELECT COALESCE(SUM(spent_micros), 0), COALESCE(SUM(spent_tokens), 0) FROM budget_usage"
                         " WHERE budget_id = ? AND bucket_us >= ? AND bucket_us < ?", (budget.budget_id, start, end))
        else:
            row = tx.one("SELECT spent_micros, spent_tokens FROM budget_usage WHERE budget_id = ? AND bucket_us = ?",
                         (budget.budget_id, start))
        spent_micros, spent_tokens = (int(row[0]), int(row[1])) if row else (0, 0)
    held_micros = held_tokens = 0
    if with_holds and book is not None:
        held_micros, held_tokens = book.held(tx, budget.budget_id, now_us)
    elif with_holds:
        held = tx.one("SELECT COALESCE(SUM(amount_micros), 0), COALESCE(SUM(tokens), 0) FROM hold_budgets"
                      " WHERE budget_id = ? AND expire_us > ?", (budget.budget_id, now_us))
        held_micros, held_tokens = (int(held[0]), int(held[1])) if held else (0, 0)
    leased_micros = leased_tokens = 0
    if with_holds:
        room = leased(tx, budget.budget_id, now_us)
        leased_micros, leased_tokens = (0, room) if budget.in_tokens else (room, 0)
    limit_micros, limit_tokens = effective_limit(tx, budget, at_us)
    return BudgetState(budget, start, end, spent_micros, spent_tokens, held_micros, held_tokens, limit_micros,
                       limit_tokens, leased_micros, leased_tokens)


@dataclass
class SpendDelta:
    """What a batch of new events adds to one bucket of one budget."""

    budget: Budget
    bucket_us: int
    micros: int = 0
    tokens: int = 0
    last_us: int = 0  # the latest event time counted in the bucket: its period is the one checked


@dataclass
class SpendOutcome:
    levels: dict[tuple[str, int], AlertLevel]  # (budget id, bucket) -> level after the batch
    alerts: list[Alert]
    states: list[BudgetState]


def add_spend(tx: Tx, fired: alerts.FiredCache, deltas: list[SpendDelta], now_us: int) -> SpendOutcome:
    """Count a batch's spend: one upsert per budget bucket, then raise the alert levels crossed.

    The caller has locked every budget involved (`tx.lock_budgets`, in id order) before inserting events.
    """
    out = SpendOutcome({}, [], [])
    for d in sorted(deltas, key=lambda d: (d.budget.budget_id, d.bucket_us)):
        limit_micros, limit_tokens = effective_limit(tx, d.budget, d.last_us)
        tx.execute(
            "INSERT INTO budget_usage (budget_id, bucket_us, spent_micros, spent_tokens, limit_micros, limit_tokens)"
            " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (budget_id, bucket_us) DO UPDATE SET"
            " spent_micros = budget_usage.spent_micros + excluded.spent_micros,"
            " spent_tokens = budget_usage.spent_tokens + excluded.spent_tokens",
            (d.budget.budget_id, d.bucket_us, d.micros, d.tokens, limit_micros, limit_tokens))
        if tx.book is not None:
            tx.book.add_spend(d.budget.budget_id, d.bucket_us, d.micros, d.tokens)
        current = state(tx, d.budget, d.last_us, now_us, with_holds=False)
        out.levels[(d.budget.budget_id, d.bucket_us)] = current.level
        out.states.append(current)
        if current.level > AlertLevel.NONE:
            out.alerts += alerts.fire(tx, fired, d.budget, current.period_start_us, current.level, current.permille,
                                      now_us)
    return out


def _class(traffic: TrafficClass) -> TrafficClass:
    return TrafficClass.INTERACTIVE if traffic == TrafficClass.UNSPECIFIED else traffic


def _policy_denial(st: BudgetState, traffic: TrafficClass) -> str:
    if st.budget.enforcement != Enforcement.HARD:
        return ""
    level, cls = st.level, _class(traffic)
    if level >= AlertLevel.EMERGENCY and cls != TrafficClass.CORE:
        return (f"budget {st.budget.budget_id} ({st.budget.scope.describe()}) is at EMERGENCY level "
                f"({st.permille / 10:.1f} % used): only CORE traffic may spend")
    if level >= AlertLevel.CRITICAL and cls == TrafficClass.BATCH:
        return (f"budget {st.budget.budget_id} ({st.budget.scope.describe()}) is at CRITICAL level "
                f"({st.permille / 10:.1f} % used): BATCH traffic is paused")
    return ""


def check(tx: Tx, snap: Snapshot, tenant_id: str, api_key_id: str, tags: dict[str, str], traffic: TrafficClass,
          now_us: int) -> Verdict:
    states = [state(tx, b, now_us, now_us) for b in snap.applicable(tenant_id, api_key_id, tags)]
    level = max((s.level for s in states), default=AlertLevel.NONE)
    for st in states:
        reason = _policy_denial(st, traffic)
        if reason:
            return Verdict(False, level, reason, states)
    return Verdict(True, level, "", states)


def reserve(tx: Tx, snap: Snapshot, req: ReserveRequest, amount: int, now_us: int, ttl_s: int,
            actor: str) -> Hold | Denied:
    if req.request_id:
        # `request_id <> ''` lets both databases use the partial unique index (holds_request) instead of
        # scanning every hold ever made: a planner cannot tell that a bound parameter is not empty.
        row = tx.one("SELECT hold_id, amount_micros, tokens, expire_us, level, state FROM holds"
                     " WHERE request_id = ? AND request_id <> ''", (req.request_id,))
        if row is not None:
            return Hold(row[0], int(row[1]), int(row[2]), int(row[3]), AlertLevel(row[4]))
    budgets = snap.applicable(req.tenant_id, req.api_key_id, req.tags)
    tx.lock_budgets([b.budget_id for b in budgets])
    tokens = req.max_prompt_tokens + req.max_completion_tokens
    states = [state(tx, b, now_us, now_us) for b in budgets]
    level = max((s.level for s in states), default=AlertLevel.NONE)
    for st in states:
        reason = _policy_denial(st, req.traffic_class)
        wanted = tokens if st.budget.in_tokens else amount
        if (not reason and st.budget.enforcement == Enforcement.HARD
                and st.spent + st.held + st.leased + wanted > st.limit):
            unit = "tokens" if st.budget.in_tokens else "micro-units"
            reason = (f"budget {st.budget.budget_id} ({st.budget.scope.describe()}) cannot cover this request: "
                      f"spent {st.spent} + held {st.held} + leased {st.leased} + requested {wanted} > limit "
                      f"{st.limit} {unit}")
        if reason:
            audit.record(tx, now_us, actor or req.api_key_id, "spend.denied", f"budget/{st.budget.budget_id}",
                         {"reason": reason, "tenant_id": req.tenant_id, "api_key_id": req.api_key_id,
                          "request_id": req.request_id, "model": req.model, "amount_micros": amount,
                          "tokens": tokens, "traffic_class": _class(req.traffic_class).name})
            return Denied(reason, st.budget.budget_id, level)
    hold_id = uuid.uuid4().hex
    expire = now_us + ttl_s * 1_000_000
    tx.execute("INSERT INTO holds (hold_id, request_id, tenant_id, amount_micros, tokens, expire_us, state, level,"
               " create_us) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
               (hold_id, req.request_id, req.tenant_id, amount, tokens, expire, OPEN, int(level), now_us))
    if budgets:
        tx.executemany("INSERT INTO hold_budgets (hold_id, budget_id, amount_micros, tokens, expire_us)"
                       " VALUES (?, ?, ?, ?, ?)", [(hold_id, b.budget_id, amount, tokens, expire) for b in budgets])
    if tx.book is not None:
        for budget in budgets:
            tx.book.add_hold(budget.budget_id, hold_id, amount, tokens, expire)
    return Hold(hold_id, amount, tokens, expire, level)


def hold_tenant(tx: Tx, hold_id: str) -> tuple[str, int]:
    row = tx.one("SELECT tenant_id, state FROM holds WHERE hold_id = ?", (hold_id,))
    if row is None:
        raise NotFound(f"hold {hold_id[:80]!r} does not exist; holds come from Reserve", field="hold_id")
    return row[0], int(row[1])


def close_hold(tx: Tx, snap: Snapshot, hold_id: str, new_state: int, now_us: int) -> bool:
    """Settle or release a hold; False when it was no longer open (settled, released or expired)."""
    rows = tx.all("SELECT budget_id FROM hold_budgets WHERE hold_id = ?", (hold_id,))
    tx.lock_budgets([r[0] for r in rows])
    changed = tx.execute("UPDATE holds SET state = ? WHERE hold_id = ? AND state = ? AND expire_us > ?",
                         (new_state, hold_id, OPEN, now_us))
    tx.execute("DELETE FROM hold_budgets WHERE hold_id = ?", (hold_id,))
    if tx.book is not None:
        tx.book.drop_hold([r[0] for r in rows], hold_id)
    return changed > 0


def lock_holds(tx: Tx, hold_ids: Sequence[str]) -> None:
    """Lock the budgets of several holds at once, in id order, before they are settled together (each
    `close_hold` locking its own in turn could deadlock with another batch on PostgreSQL; SQLite's single
    writer needs no lock)."""
    if tx.dialect == "postgres" and len(hold_ids) > 1:
        rollups.hold_off_roll(tx)  # first, as ingestion takes it: a roll waits for no budget
        marks = ", ".join("?" * len(hold_ids))
        tx.lock_budgets([r[0] for r in tx.all(f"SELECT budget_id FROM hold_budgets WHERE hold_id IN ({marks})",
                                              list(hold_ids))])


def check_settle_tenant(tx: Tx, hold_id: str, tenant_id: str) -> None:
    owner, _ = hold_tenant(tx, hold_id)
    if owner != tenant_id:
        raise FailedPrecondition(f"hold {hold_id} belongs to tenant {owner!r}, but the event is for tenant "
                                 f"{tenant_id!r}; settle a hold with its own tenant's usage", field="event.tenant_id")
