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

Billing's roller adds them in steps (`step`, then `apply`) of at least `BURST_BATCH_US` of recorded time
(`batch_us`): a step costs about the same for one second's events as for a few seconds'. The step's window
pass only reads, so the roller runs it on a read snapshot beside the writer and writes its few rows in a
short transaction of their own (`apply`, which drops a step the table moved past meanwhile); ingestion does
not wait behind it. `usage_burst_rule.seq` is the last event the table holds (at most the rollup mark); reports check
the events after it in the events, within one window of them.

`usage_burst_rule` records the (max_requests, window_s) the table was built for. Migration 6 built it for
the default rule (50, 10) from the events already recorded. When billing runs with another rule, its next
roll's step rebuilds the table from all the events up to the rollups' mark (one window pass over the
ledger, on the read snapshot, then written at once); until it is written, reports find the rule differs and
check the whole hours' events themselves (`reports._bursting`), so no answer is ever built from a table of
another rule.
"""

from __future__ import annotations

from dataclasses import dataclass

from services.billing.store.base import Row, Tx

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


def runs(rule: Rule, source: str, where: str, per: tuple[str, ...] = ("tenant_id", "api_key_id")) -> str:
    """Per (hour of the first request, *`per`): the latest first and earliest last request of the runs among
    the events of `source` matching `where` (`e.` names the events), each key's runs found per `per`."""
    n, window = int(rule[0]), int(rule[1]) * 1_000_000
    columns, inner = ", ".join(per), ", ".join(f"e.{c}" for c in per)
    return (f"SELECT first_us / {_HOUR} * {_HOUR}, {columns}, MAX(first_us), MIN(end_us) FROM ("
            f"SELECT {inner}, e.end_us, LAG(e.end_us, {n}) OVER (PARTITION BY {inner} ORDER BY e.end_us)"
            f" AS first_us FROM {source} WHERE {where}) AS runs WHERE end_us - first_us < {window}"
            f" GROUP BY first_us / {_HOUR} * {_HOUR}, {columns}")


def backfill(rule: Rule = DEFAULT_RULE, through_seq: str = "") -> str:
    """The statement filling the (empty) table from the events (up to `through_seq`, an SQL expression)."""
    where = f"e.seq <= {through_seq}" if through_seq else "true"
    return f"INSERT INTO {TABLE} ({_COLUMNS}) {runs(rule, 'events AS e', where)}"


# Every (key, tenant) pair seen: a key of several tenants has its runs checked in the events by reports
# that span tenants (the table's runs are per tenant).
KEY_TENANTS_BACKFILL = (f"INSERT INTO {KEY_TENANTS} (api_key_id, tenant_id) SELECT DISTINCT api_key_id, tenant_id"
                        f" FROM events")


def state(tx: Tx) -> tuple[Rule, int] | None:
    """The rule the table was built for and the seq of the last event it holds (None before migration 6)."""
    row = tx.one(f"SELECT max_requests, window_s, seq FROM {RULE_TABLE} WHERE id = 1")
    return ((int(row[0]), int(row[1])), int(row[2])) if row is not None else None


def rebuild(tx: Tx, rule: Rule, through_seq: int) -> None:
    """Recompute the table for `rule` from the events up to `through_seq`."""
    tx.execute(f"DELETE FROM {TABLE}")
    tx.execute(backfill(rule, str(int(through_seq))))
    tx.execute(f"UPDATE {RULE_TABLE} SET max_requests = ?, window_s = ?, seq = ? WHERE id = 1",
               [int(rule[0]), int(rule[1]), int(through_seq)])


@dataclass(frozen=True)
class Step:
    """What `apply` writes, computed when the table held the events up to `held` for `rule`: the runs among
    the events with seqs up to `end` that change it, or with `rebuilt_for`, the whole table for that rule."""
    rule: Rule
    held: int
    end: int
    rows: list[Row]
    rebuilt_for: Rule | None = None


def follow(tx: Tx, end: int, rule: Rule | None) -> None:
    """In the roll's transaction, whose new mark is `end` (its statements also list the rolled events'
    (key, tenant) pairs): with a `rule` other than the table's, rebuild the table for it."""
    found = state(tx)
    if found is not None and rule is not None and tuple(rule) != found[0]:
        rebuild(tx, rule, end)


def step(tx: Tx, end: int, batch_us: int = 0, rule: Rule | None = None) -> Step | None:
    """The runs the events after the table's seq and up to `end` (at most the rollups' mark) start or
    shorten, or None when there are none to add. It only reads, so billing computes it on a read snapshot
    beside the writer and ingestion does not wait for it. `batch_us`: None until the events not added yet
    were recorded over at least that long (or number `BATCH_EVENTS`), so a busy ledger's events are added
    in fewer, larger steps (a step reads one window of events around them). With a `rule` other than the
    table's: the whole table for that rule, from every event up to `end` (one window pass over the ledger,
    off the writer too; until it is applied, reports check the events themselves)."""
    found = state(tx)
    if found is None:
        return None
    stored, held = found
    if rule is not None and tuple(rule) != stored:
        new = (int(rule[0]), int(rule[1]))
        return Step(stored, held, end, tx.all(runs(new, "events AS e", f"e.seq <= {int(end)}")), new)
    if end <= held:
        return None
    if batch_us and end - held < BATCH_EVENTS:
        span = tx.one(f"SELECT MAX(recorded_us) - MIN(recorded_us) FROM events WHERE seq > {int(held)}"
                      f" AND seq <= {int(end)}")
        if span is None or span[0] is None or int(span[0]) < batch_us:
            return None
    window = stored[1] * 1_000_000
    touched = (f"SELECT tenant_id, api_key_id, MIN(end_us) - {window} AS lo, MAX(end_us) + {window} AS hi"
               f" FROM events WHERE seq > {int(held)} AND seq <= {int(end)} GROUP BY tenant_id, api_key_id")
    # All keys' events in the span of the touched ranges are read once by time (the index on end_us), then
    # narrowed to each touched key's own range.
    where = (f"e.end_us >= (SELECT MIN(lo) FROM touched) AND e.end_us <= (SELECT MAX(hi) FROM touched)"
             f" AND e.seq <= {int(end)} AND e.tenant_id = r.tenant_id AND e.api_key_id = r.api_key_id"
             f" AND e.end_us >= r.lo AND e.end_us <= r.hi")
    source = f"{_BY_TIME[tx.dialect]} CROSS JOIN touched AS r"
    return Step(stored, held, end, tx.all(f"WITH touched AS ({touched}) {runs(stored, source, where)}"))


def apply(tx: Tx, found: Step) -> bool:
    """Write a step in a write transaction: upsert its runs (the latest start and the earliest end per
    hour), or replace the table with a rebuild's, and move the table's seq to its end (and its rule to the
    rebuild's); False (nothing written) when the table moved or was rebuilt since the step was computed:
    the next step covers its events again."""
    locking = " FOR UPDATE" if tx.dialect == "postgres" else ""
    now = tx.one(f"SELECT max_requests, window_s, seq FROM {RULE_TABLE} WHERE id = 1{locking}")
    if now is None or ((int(now[0]), int(now[1])), int(now[2])) != (tuple(found.rule), found.held):
        return False
    if found.rebuilt_for is not None:
        tx.execute(f"DELETE FROM {TABLE}")
        tx.execute(f"UPDATE {RULE_TABLE} SET max_requests = ?, window_s = ? WHERE id = 1", list(found.rebuilt_for))
    greatest, least = _GREATEST[tx.dialect], _LEAST[tx.dialect]
    if found.rows:
        tx.executemany(f"INSERT INTO {TABLE} ({_COLUMNS}) VALUES (?, ?, ?, ?, ?)"
                       f" ON CONFLICT (hour_us, tenant_id, api_key_id) DO UPDATE SET"
                       f" latest_start_us = {greatest}({TABLE}.latest_start_us, excluded.latest_start_us),"
                       f" first_end_us = {least}({TABLE}.first_end_us, excluded.first_end_us)",
                       sorted(tuple(r) for r in found.rows))
    tx.execute(f"UPDATE {RULE_TABLE} SET seq = ? WHERE id = 1", [int(found.end)])
    return True


def keep(tx: Tx, end: int, rule: Rule | None) -> None:
    """`follow` and add the runs of the events up to `end` at once, in the roll's transaction."""
    follow(tx, end, rule)
    found = step(tx, end)
    if found is not None:
        apply(tx, found)


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


__all__ = ["BATCH_EVENTS", "DEFAULT_RULE", "KEY_TENANTS", "KEY_TENANTS_BACKFILL", "RULE_TABLE", "TABLE", "Rule", "Step",
           "apply", "backfill", "flagged", "follow", "keep", "rebuild", "runs", "shared_keys", "state", "step"]
