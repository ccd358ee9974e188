"""Router leases: room on a hard budget that one router may spend without a billing call per request.

A lease belongs to one router and one budget (one open lease per pair) and is kept in the budget's own
unit (micro-units or tokens). `granted` is the cumulative room handed to the router since the lease
opened; `used` is what the events naming the lease have recorded. Until it expires (returned or not), a
lease counts `granted - used` (at least 0) against its budget, beside committed spend and open holds — so a
Reserve, another router's grant and this router's refresh all see it.

Exactness: every grant, refresh, Reserve and event that touches a budget first locks it
(`tx.lock_budgets`: PostgreSQL row locks; SQLite's single writer), and a grant is computed inside that
transaction as

    extra <= limit - spent - held - (every lease's room, this one's included) - edge

so spent + held + leased never passes the limit, however many routers ask at once. An event recorded
against a lease moves its cost from the lease's room (`used` grows) to committed spend in the same
commit: the sum stays where it was. `edge` (a share of the limit) is never leased: near the limit the
grants shrink to nothing and routers fall back to per-request Reserve, which is exact at the edge.

The router's side of the contract: it admits a request's worst case only while `consumed + worst <=
granted` on every lease that applies and the lease expires later than the request may run; it reports
its cumulative `consumed` at each refresh. A refresh never lowers `granted` (the router may have admitted
up to it since it last reported), and ReturnLease lowers it only to what the router says it consumed (it
admits nothing more against a returned lease). A lease expires at most `lease_ttl_s` after its last
refresh and never after its budget's period ends.

Sizing: the router's spend rate since its previous refresh x `lease_refresh_s`, between a floor and a cap
(shares of the limit); a new lease starts at the floor.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass, replace

from services.billing.budgets import LEASE_OPEN, LEASE_RETURNED, state
from services.billing.catalog import Snapshot
from services.billing.model import Budget, BudgetState, Enforcement, Lease, LeaseRequest
from services.billing.store.base import Tx
from services.common.errors import FailedPrecondition, NotFound


@dataclass(frozen=True)
class LeasePolicy:
    ttl_s: int = 60
    refresh_s: int = 10
    floor_permille: int = 10  # a new or idle lease's room: 1 % of the limit
    cap_permille: int = 100  # the most room one refresh aims at: 10 % of the limit
    edge_permille: int = 50  # the last 5 % of the limit is never leased (per-request Reserve)


def _current(tx: Tx, router_id: str, budget_id: str, now_us: int) -> tuple[str, int, int, int, int] | None:
    row = tx.one("SELECT lease_id, granted, used, mark, mark_us FROM leases WHERE router_id = ? AND budget_id = ?"
                 " AND expire_us > ? AND state = ? ORDER BY create_us DESC LIMIT 1",
                 (router_id, budget_id, now_us, LEASE_OPEN))
    return (str(row[0]), int(row[1]), int(row[2]), int(row[3]), int(row[4])) if row else None


def _target(policy: LeasePolicy, limit: int, consumed: int, mark: int, mark_us: int, now_us: int) -> int:
    """The room this router should have after the refresh: its recent rate x the refresh interval."""
    floor, cap = limit * policy.floor_permille // 1000, limit * policy.cap_permille // 1000
    if mark_us <= 0 or now_us <= mark_us:
        return floor
    rate = max(consumed - mark, 0) * 1_000_000 // (now_us - mark_us)  # per second
    return min(max(rate * policy.refresh_s, floor), cap)


def acquire(tx: Tx, snap: Snapshot, policy: LeasePolicy, req: LeaseRequest, now_us: int,
            states: list[BudgetState] | None = None) -> list[Lease]:
    """Grant or refresh this router's lease on every hard budget that applies to the caller; `states`, when
    given, receives each budget's state after its grant (for metrics)."""
    budgets = [b for b in snap.applicable(req.tenant_id, req.api_key_id, req.tags)
               if b.enforcement == Enforcement.HARD]
    tx.lock_budgets([b.budget_id for b in budgets])
    sink: list[BudgetState] = [] if states is None else states
    return [_grant(tx, policy, req, b, now_us, sink) for b in sorted(budgets, key=lambda b: b.budget_id)]


def _grant(tx: Tx, policy: LeasePolicy, req: LeaseRequest, budget: Budget, now_us: int,
           states: list[BudgetState]) -> Lease:
    st = state(tx, budget, now_us, now_us)  # spent, held and every lease's room, this router's included
    expire = min(now_us + policy.ttl_s * 1_000_000, st.period_end_us)
    current = _current(tx, req.router_id, budget.budget_id, now_us)
    if current is None:
        lease_id, granted, used, mark, mark_us = uuid.uuid4().hex, 0, 0, 0, 0
    else:
        lease_id, granted, used, mark, mark_us = current
    consumed = min(max(req.consumed.get(lease_id, 0), used), granted)
    free = st.limit - st.spent - st.held - st.leased - st.limit * policy.edge_permille // 1000
    wanted = consumed + _target(policy, st.limit, consumed, mark, mark_us, now_us) - granted
    added = max(min(wanted, free), 0)
    granted += added
    states.append(replace(st, leased_tokens=st.leased_tokens + added) if budget.in_tokens
                  else replace(st, leased_micros=st.leased_micros + added))
    if current is None:
        tx.execute("INSERT INTO leases (lease_id, router_id, budget_id, in_tokens, granted, used, expire_us, state,"
                   " mark, mark_us, create_us) VALUES (?, ?, ?, ?, ?, 0, ?, ?, 0, ?, ?)",
                   (lease_id, req.router_id, budget.budget_id, int(budget.in_tokens), granted, expire, LEASE_OPEN, now_us,
                    now_us))
    else:
        tx.execute("UPDATE leases SET granted = ?, expire_us = ?, mark = ?, mark_us = ? WHERE lease_id = ?",
                   (granted, expire, consumed, now_us, lease_id))
    return Lease(lease_id, budget.budget_id, budget.in_tokens, granted, used, expire, policy.refresh_s, st.level)


def return_lease(tx: Tx, lease_id: str, router_id: str, consumed: int, now_us: int) -> bool:
    """Keep only what the router consumed (for its events on the way); False when no longer open."""
    row = tx.one("SELECT router_id, budget_id, granted, used, expire_us, state FROM leases WHERE lease_id = ?",
                 (lease_id,))
    if row is None:
        raise NotFound(f"lease {lease_id[:80]!r} does not exist; leases come from AcquireLeases", field="lease_id")
    if row[0] != router_id:
        raise FailedPrecondition(f"lease {lease_id} belongs to another router; return a lease with the router_id "
                                 "that acquired it", field="router_id")
    tx.lock_budgets([str(row[1])])
    if int(row[5]) != LEASE_OPEN or int(row[4]) <= now_us:
        return False
    # A returned lease is never refreshed again; until it expires it still counts what the router consumed
    # but billing has not recorded yet (its events are on their way).
    keep = min(max(consumed, int(row[3])), int(row[2]))
    tx.execute("UPDATE leases SET granted = ?, state = ? WHERE lease_id = ?", (keep, LEASE_RETURNED, lease_id))
    return True


def give_up(tx: Tx, reported: dict[str, tuple[str, int]], now_us: int) -> int:
    """A budget change: return each reported lease (lease id -> (its router, what it consumed)) as
    ReturnLease would, in the change's own commit. Unknown, foreign or closed leases are skipped. Returns
    how many were returned."""
    returned = 0
    for lease_id, (router_id, consumed) in sorted(reported.items()):
        row = tx.one("SELECT router_id, granted, used, expire_us, state FROM leases WHERE lease_id = ?", (lease_id,))
        if row is None or row[0] != router_id or int(row[4]) != LEASE_OPEN or int(row[3]) <= now_us:
            continue
        keep = min(max(consumed, int(row[2])), int(row[1]))
        tx.execute("UPDATE leases SET granted = ?, state = ? WHERE lease_id = ?", (keep, LEASE_RETURNED, lease_id))
        returned += 1
    return returned


def record_usage(tx: Tx, spend: Sequence[tuple[str, frozenset[str], int, int]]) -> None:
    """Add events' spend to the leases they name: (lease id, ids of the budgets the event counts against,
    micro-units, tokens). A lease of a budget the event does not count against, or an unknown one, is
    ignored (its room then keeps counting until it expires: never less than what was spent)."""
    ids = sorted({lease_id for lease_id, _, _, _ in spend})
    if not ids:
        return
    marks = ", ".join("?" * len(ids))
    rows = {str(r[0]): (str(r[1]), bool(r[2])) for r in tx.all(
        f"SELECT lease_id, budget_id, in_tokens FROM leases WHERE lease_id IN ({marks})", ids)}
    added: dict[str, int] = {}
    for lease_id, budget_ids, micros, tokens in spend:
        found = rows.get(lease_id)
        if found is not None and found[0] in budget_ids:
            added[lease_id] = added.get(lease_id, 0) + (tokens if found[1] else micros)
    for lease_id in sorted(added):
        tx.execute("UPDATE leases SET used = used + ? WHERE lease_id = ?", (added[lease_id], lease_id))


def purge_expired(tx: Tx, now_us: int) -> int:
    return tx.execute("DELETE FROM leases WHERE expire_us <= ?", (now_us,))
