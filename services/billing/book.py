"""The writer's in-memory book of budget spend and open holds (SQLite: one billing process per database).

With the embedded store, every write of the ledger goes through one writer thread of one process (the
store takes an exclusive lock on the database file, so a second process cannot open it). That makes the
writer's own view of each budget authoritative: this book caches, per budget, the spend of each window
asked for and the open holds, so that a Reserve or an ingested batch decides without reading the tables
again; each budget's open holds are kept with their running totals and an expiry heap, so the check
costs the same however many holds are open. Rules that keep it exact:

- an entry is loaded from the tables on first use, inside the writer's current transaction, so it already
  includes every earlier write of that transaction;
- every change is applied to the book right AFTER the SQL statement that makes it durable (same unit, same
  transaction), and only to entries loaded before that statement;
- when a unit or a commit is rolled back, or prices/budgets change, the store clears the whole book, which
  then reloads from what is really in the tables.

The book is used only by the writer thread; readers (CheckBudget, reports) query the committed tables.
"""

from __future__ import annotations

import heapq

from services.billing.store.base import Tx


class _Holds:
    """One budget's open holds with their running totals, and their expiries in a heap, so that asking
    for the total costs O(1) plus the holds that expired since, however many are open."""

    def __init__(self, rows: dict[str, tuple[int, int, int]]) -> None:
        self.open: dict[str, tuple[int, int, int]] = {}  # hold id -> (micros, tokens, expire_us)
        self.micros = self.tokens = 0
        self._expiries: list[tuple[int, str]] = []  # (expire_us, hold id), dropped holds left in lazily
        for hold_id, (micros, tokens, expire_us) in rows.items():
            self.add(hold_id, micros, tokens, expire_us)

    def add(self, hold_id: str, micros: int, tokens: int, expire_us: int) -> None:
        self.drop(hold_id)
        self.open[hold_id] = (micros, tokens, expire_us)
        self.micros += micros
        self.tokens += tokens
        heapq.heappush(self._expiries, (expire_us, hold_id))

    def drop(self, hold_id: str) -> None:
        held = self.open.pop(hold_id, None)
        if held is not None:
            self.micros -= held[0]
            self.tokens -= held[1]
            if len(self._expiries) > 2 * len(self.open) + 64:  # mostly holds already closed: rebuild
                self._expiries = [(expire, h) for h, (_, _, expire) in self.open.items()]
                heapq.heapify(self._expiries)

    def expire(self, now_us: int) -> None:
        """Drop the holds expired at `now_us`: an expired hold never counts again (the janitor deletes its rows)."""
        expiries = self._expiries
        while expiries and expiries[0][0] <= now_us:
            expire_us, hold_id = heapq.heappop(expiries)
            held = self.open.get(hold_id)
            if held is not None and held[2] == expire_us:
                self.drop(hold_id)


class Book:
    def __init__(self) -> None:
        self._spent: dict[str, dict[tuple[int, int], list[int]]] = {}
        self._holds: dict[str, _Holds] = {}

    def clear(self) -> None:
        self._spent.clear()
        self._holds.clear()

    # --- spend ------------------------------------------------------------------------------------
    def spent(self, tx: Tx, budget_id: str, start_us: int, end_us: int) -> tuple[int, int]:
        """(micro-units, tokens) spent in the buckets that start in [start, end)."""
        windows = self._spent.setdefault(budget_id, {})
        entry = windows.get((start_us, end_us))
        if entry is None:
            row = tx.one("SELECT COALESCE(SUM(spent_micros), 0), COALESCE(SUM(spent_tokens), 0) FROM budget_usage"
                         " WHERE budget_id = ? AND bucket_us >= ? AND bucket_us < ?", (budget_id, start_us, end_us))
            entry = windows[(start_us, end_us)] = [int(row[0]), int(row[1])] if row else [0, 0]
        return entry[0], entry[1]

    def add_spend(self, budget_id: str, bucket_us: int, micros: int, tokens: int) -> None:
        """Call right after the spend was written to `budget_usage`."""
        for (start, end), entry in self._spent.get(budget_id, {}).items():
            if start <= bucket_us < end:
                entry[0] += micros
                entry[1] += tokens

    # --- holds ------------------------------------------------------------------------------------
    def held(self, tx: Tx, budget_id: str, now_us: int) -> tuple[int, int]:
        """(micro-units, tokens) of the budget's holds that are open and not expired at `now_us`."""
        holds = self._holds.get(budget_id)
        if holds is None:
            holds = self._holds[budget_id] = _Holds({
                str(r[0]): (int(r[1]), int(r[2]), int(r[3])) for r in tx.all(
                    "SELECT hold_id, amount_micros, tokens, expire_us FROM hold_budgets"
                    " WHERE budget_id = ? AND expire_us > ?", (budget_id, now_us))})
        holds.expire(now_us)
        return holds.micros, holds.tokens

    def add_hold(self, budget_id: str, hold_id: str, micros: int, tokens: int, expire_us: int) -> None:
        """Call right after the hold's `hold_budgets` row was inserted."""
        holds = self._holds.get(budget_id)
        if holds is not None:
            holds.add(hold_id, micros, tokens, expire_us)

    def drop_hold(self, budget_ids: list[str], hold_id: str) -> None:
        """Call right after the hold's `hold_budgets` rows were deleted (settled or released)."""
        for budget_id in budget_ids:
            holds = self._holds.get(budget_id)
            if holds is not None:
                holds.drop(hold_id)
