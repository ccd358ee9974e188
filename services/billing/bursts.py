"""Burst starts per api key and hour, kept with the rollups, so the burst rule reads no events of whole hours.

A burst is a run of more than `max_requests` of a key's requests (by end time) within `window_s` seconds.
`usage_key_bursts` holds, per (hour, tenant, api key), over the runs whose first request ends in that hour:
`latest_start_us`, the latest first request (what `reports._burst_starts` finds), and `first_end_us`, the
earliest last request (a run counts in a report only when it ends inside its whole hours). A run's first
request is its last's `max_requests`-th predecessor (`LAG`), per tenant and key.

Kept exactly for the events up to its own mark, in the rollups' roll transaction (`keep`, called by
`rollups.roll`): events only add runs (a start that had more than `max_requests` requests within the window
still has them), and a new event ending at t can only start or shorten the runs starting in (t - window, t],
which end before t + window. So each roll recomputes, for each key with rolled events, the runs among that
key's events in [min(t) - window, max(t) + window] (one statement) and upserts the latest start (MAX) and the
earliest end (MIN) per hour; a late event is handled alike. `usage_key_tenants` lists each (key, tenant)
seen, so a report across tenants checks a key of several tenants in the events. A roll reads the events within one window of the
rolled ones' end times, all keys' in the span from the earliest to the latest of them.

Billing's roller adds them in steps of at least `BURST_BATCH_US` of recorded time (`batch_us`): a step
costs about the same for one second's events as for a few seconds', so this keeps the roll cheap for a busy
ledger. `usage_burst_rule.seq` is the last event the table holds (at most the rollup mark); reports check
the events after it in the events, within one window of them.

`usage_burst_rule` records the (max_requests, window_s) the table was built for. Migration 6 built it for
the default rule (50, 10) from the events already recorded. When billing runs with another rule, its next
roll rebuilds the table from all the events up to the new mark (one window pass over the ledger, in that
roll's transaction); until it commits, reports find the rule differs and check the whole hours' events
themselves (`reports._bursting`), so no answer is ever built from a table of another rule.
"""

from __future__ import annotations

from services.billing.store.base import Tx

TABLE, RULE_TABLE, KEY_TENANTS = "usage_key_bursts", "usage_burst_rule", "usage_key_tenants"
DEFAULT_RULE = (50, 10)  # (max_requests, window_s): billing's defaults (config.anomaly_*)
BATCH_EVENTS = 100_000  # with a batch time, add this many events at once however fast they came
_HOUR = 3_600_000_000
_COLUMNS = "hour_us, tenant_id, api_key_id, latest_start_us, first_end_us"
_GREATEST = {"sqlite": "MAX", "postgres": "GREATEST"}
_LEAST = {"sqlite": "MIN", "postgres": "LEAST"}
# A roll's events by time: SQLite's planner would rather scan the tenant index in the window's order.
_BY_TIME = {"sqlite": "events AS e INDEXED BY events_time_key", "postgres": "events AS e"}

Rule = tuple[int, int]


def _runs(rule: Rule, source: str, where: str) -> str:
    """Per (hour of the first request, tenant, key): the latest first and earliest last request of the runs
    among the events of `source` matching `where` (`e.` names the events)."""
    n, window = int(rule[0]), int(rule[1]) * 1_000_000
    return (f"SELECT first_us / {_HOUR} * {_HOUR}, tenant_id, api_key_id, MAX(first_us), MIN(end_us) FROM ("
            f"SELECT e.tenant_id, e.api_key_id, e.end_us, LAG(e.end_us, {n}) OVER"
            f" (PARTITION BY e.tenant_id, e.api_key_id ORDER BY e.end_us) AS first_us FROM {source} WHERE {where})"
            f" AS runs WHERE end_us - first_us < {window} GROUP BY first_us / {_HOUR} * {_HOUR}, tenant_id, api_key_id")


def backfill(rule: Rule = DEFAULT_RULE, through_seq: str = "") -> str:
    """The statement filling the (empty) table from the events (up to `through_seq`, an SQL expression)."""
    where = f"e.seq <= {through_seq}" if through_seq else "true"
    return f"INSERT INTO {TABLE} ({_COLUMNS}) {_runs(rule, 'events AS e', where)}"


# Every (key, tenant) pair seen: a key of several tenants has its runs checked in the events by reports
# that span tenants (the table's runs are per tenant).
KEY_TENANTS_BACKFILL = (f"INSERT INTO {KEY_TENANTS} (api_key_id, tenant_id) SELECT DISTINCT api_key_id, tenant_id"
                        f" FROM events")


def state(tx: Tx) -> tuple[Rule, int] | None:
    """The rule the table was built for and the seq of the last event it holds (None before migration 6)."""
    row = tx.one(f"SELECT max_requests, window_s, seq FROM {RULE_TABLE} WHERE id = 1")
    return ((int(row[0]), int(row[1])), int(row[2])) if row is not None else None


def stored_rule(tx: Tx) -> Rule | None:
    """The rule the table was built for (None before migration 6)."""
    found = state(tx)
    return found[0] if found is not None else None


def rebuild(tx: Tx, rule: Rule, through_seq: int) -> None:
    """Recompute the table for `rule` from the events up to `through_seq`."""
    tx.execute(f"DELETE FROM {TABLE}")
    tx.execute(backfill(rule, str(int(through_seq))))
    tx.execute(f"UPDATE {RULE_TABLE} SET max_requests = ?, window_s = ?, seq = ? WHERE id = 1",
               [int(rule[0]), int(rule[1]), int(through_seq)])


def keep(tx: Tx, start: int, end: int, rule: Rule | None, batch_us: int = 0) -> None:
    """Add the runs the events with seqs up to `end` (the rollups' new mark; `start`: the old one) make, in
    the roll's transaction; with a `rule` other than the table's, rebuild the table for it instead.
    `batch_us`: wait until the events not added yet were recorded over at least that long (or number
    `BATCH_EVENTS`), so a busy ledger's events are added in fewer, larger steps."""
    found = state(tx)
    if found is None:
        return
    stored, held = found
    if end > start:
        tx.execute(f"INSERT INTO {KEY_TENANTS} (api_key_id, tenant_id) SELECT DISTINCT api_key_id, tenant_id"
                   f" FROM events WHERE seq > {int(start)} AND seq <= {int(end)} ORDER BY 1, 2"
                   f" ON CONFLICT DO NOTHING")
    if rule is not None and tuple(rule) != stored:
        rebuild(tx, rule, end)
        return
    if end <= held:
        return
    if batch_us and end - held < BATCH_EVENTS:
        span = tx.one(f"SELECT MAX(recorded_us) - MIN(recorded_us) FROM events WHERE seq > {int(held)}"
                      f" AND seq <= {int(end)}")
        if span is None or span[0] is None or int(span[0]) < batch_us:
            return
    start = held
    window = stored[1] * 1_000_000
    touched = (f"SELECT tenant_id, api_key_id, MIN(end_us) - {window} AS lo, MAX(end_us) + {window} AS hi"
               f" FROM events WHERE seq > {int(start)} AND seq <= {int(end)} GROUP BY tenant_id, api_key_id")
    # All keys' events in the span of the touched ranges are read once by time (the index on end_us), then
    # narrowed to each touched key's own range.
    where = (f"e.end_us >= (SELECT MIN(lo) FROM touched) AND e.end_us <= (SELECT MAX(hi) FROM touched)"
             f" AND e.seq <= {int(end)} AND e.tenant_id = r.tenant_id AND e.api_key_id = r.api_key_id"
             f" AND e.end_us >= r.lo AND e.end_us <= r.hi")
    greatest, least = _GREATEST[tx.dialect], _LEAST[tx.dialect]
    tx.execute(f"WITH touched AS ({touched}) INSERT INTO {TABLE} ({_COLUMNS})"
               f" {_runs(stored, f'{_BY_TIME[tx.dialect]} CROSS JOIN touched AS r', where)}"
               f" ON CONFLICT (hour_us, tenant_id, api_key_id) DO UPDATE SET"
               f" latest_start_us = {greatest}({TABLE}.latest_start_us, excluded.latest_start_us),"
               f" first_end_us = {least}({TABLE}.first_end_us, excluded.first_end_us)")
    tx.execute(f"UPDATE {RULE_TABLE} SET seq = ? WHERE id = 1", [int(end)])


def shared_keys(tx: Tx) -> list[str]:
    """The keys recorded under more than one tenant (up to the mark)."""
    return [str(r[0]) for r in tx.all(f"SELECT api_key_id FROM {KEY_TENANTS} GROUP BY api_key_id"
                                      f" HAVING COUNT(*) > 1 ORDER BY 1")]


def flagged(tx: Tx, begin: int, first: int, last: int, start_us: int, tenant_id: str) -> set[str]:
    """Keys with a run (among the events up to the mark) that starts in [begin, last) and ends before `last`:
    any in the whole hours [first, last), and in the partial hour [begin, first) one starting at `start_us`
    or later (a run starting there ends before `last` when the caller reads that hour)."""
    where = " AND tenant_id = ?" if tenant_id else ""
    rows = tx.all(f"SELECT DISTINCT api_key_id FROM {TABLE} WHERE hour_us >= ? AND hour_us < ?{where}"
                  f" AND ((hour_us >= ? AND first_end_us < ?) OR (hour_us < ? AND latest_start_us >= ?))",
                  [begin, last, *([tenant_id] if tenant_id else []), first, last, first, start_us])
    return {str(r[0]) for r in rows}


__all__ = ["BATCH_EVENTS", "DEFAULT_RULE", "KEY_TENANTS", "KEY_TENANTS_BACKFILL", "RULE_TABLE", "TABLE", "Rule", "backfill", "flagged", "keep", "rebuild", "shared_keys", "state", "stored_rule"]
