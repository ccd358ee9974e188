"""Burst starts per api key and hour, kept with the rollups, so the burst rule reads no events of whole hours.

A burst is a run of more than `max_requests` of a key's requests (by end time) within `window_s` seconds.
`usage_key_bursts` holds, per (hour, tenant, api key), over the runs whose first request ends in that hour:
`latest_start_us`, the latest first request (what `reports._burst_starts` finds), and `first_end_us`, the
earliest last request (a run counts in a report only when it ends inside its whole hours). A run's first
request is its last's `max_requests`-th predecessor (`LAG`), per tenant and key.

Kept exactly for the events up to its own mark, in the rollups' roll transaction (`keep`, called by
`rollups.roll`): events only add runs (a start that had more than `max_requests` requests within the window
still has them), and a new event ending at t can only start or shorten the runs starting in (t - window, t],
which end before t + window. So each step recomputes, for each key with new events, the runs ending at or
after its first new one, from its events in [min(t) - window, ...], and upserts the latest start (MAX) and
the earliest end (MIN) per hour; a late event is handled alike. `usage_key_tenants` lists each (key, tenant)
seen, so a report across tenants checks a key of several tenants in the events.

Billing's roller keeps each key's latest end times from one step to the next (`Tails`): a key that holds
`max_requests` of them before its first new event (or whose first new event is a window or more after the
start of what it holds) needs no other event, so a step of events in order reads only its own events; other
keys (new to the roller, or later than that) read one window of events before their first new one, by time.
A step only serves the tails of its own start (the table's seq); any other step starts them over.

Billing's roller adds them in steps (`step`, then `apply`) of at least `BURST_BATCH_US` of recorded time
(`batch_us`), so its reads of earlier events are few. The step only reads, so the roller runs it on a read
snapshot beside the writer and writes its few rows in a short transaction of their own (`apply`, which drops
a step the table moved past meanwhile); ingestion does not wait behind it. `usage_burst_rule.seq` is the last
event the table holds (at most the rollup mark); reports check the events after it in the events, within
one window of them.

`usage_burst_rule` records the (max_requests, window_s) the table was built for. Migration 6 built it for
the default rule (50, 10) from the events already recorded. When billing runs with another rule, its next
roll's step rebuilds the table from all the events up to the rollups' mark (one window pass over the
ledger, on the read snapshot, then written at once); until it is written, reports find the rule differs and
check the whole hours' events themselves (`reports._bursting`), so no answer is ever built from a table of
another rule.
"""

from __future__ import annotations

import bisect
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass

from services.billing.store.base import Row, Tx

TABLE, RULE_TABLE, KEY_TENANTS = "usage_key_bursts", "usage_burst_rule", "usage_key_tenants"
DEFAULT_RULE = (50, 10)  # (max_requests, window_s): billing's defaults (config.anomaly_*)
TAIL_KEYS = 100_000  # the most keys whose tails billing's roller keeps (`Tails`)
_READ_KEYS = 2_000  # keys whose earlier events one statement reads
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
    tails: Mapping[tuple[str, str], Tail] | None = None  # each touched key's, as of `end` (`Tails.adopt`)
    read_back: int = 0  # the keys whose events before their new ones were read (no tail served them)


def follow(tx: Tx, end: int, rule: Rule | None) -> None:
    """In the roll's transaction, whose new mark is `end` (its statements also list the rolled events'
    (key, tenant) pairs): with a `rule` other than the table's, rebuild the table for it."""
    found = state(tx)
    if found is not None and rule is not None and tuple(rule) != found[0]:
        rebuild(tx, rule, end)


def step(tx: Tx, end: int, batch_us: int = 0, rule: Rule | None = None, tails: Tails | None = None) -> Step | None:
    """The runs the events after the table's seq and up to `end` (at most the rollups' mark) start or
    shorten, or None when there are none to add. It only reads, so billing computes it on a read snapshot
    beside the writer and ingestion does not wait for it. `batch_us`: None until the events not added yet
    were recorded over at least that long (or number `BATCH_EVENTS`), so a busy ledger's events are added
    in fewer, larger steps. `tails`: each key's latest end times as of the table's seq (`Tails`, kept by
    the roller), so a key whose new events come after the ones they would shorten reads no other events;
    the rest read one window of events before their first new one. With a `rule` other than the table's:
    the whole table for that rule, from every event up to `end` (one window pass over the ledger, off the
    writer too; until it is applied, reports check the events themselves)."""
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
    known: Mapping[tuple[str, str], Tail] = tails.at(stored, held) if tails is not None else {}
    n, window = stored[0], stored[1] * 1_000_000
    added: dict[tuple[str, str], list[int]] = {}
    for tenant_id, api_key_id, end_us in tx.all(f"SELECT tenant_id, api_key_id, end_us FROM events"
                                                f" WHERE seq > {int(held)} AND seq <= {int(end)}"):
        added.setdefault((str(tenant_id), str(api_key_id)), []).append(int(end_us))
    found_runs: dict[tuple[int, str, str], list[int]] = {}
    kept: dict[tuple[str, str], Tail] = {}
    unread: dict[tuple[str, str], list[int]] = {}
    for key, ends in added.items():
        ends.sort()
        tail = known.get(key)
        ordered = sorted(tail.ends + tuple(ends)) if tail is not None else []
        first = bisect.bisect_left(ordered, ends[0])
        if tail is None or (first < n and ordered[first] - tail.since < window):
            unread[key] = ends  # its earlier events may shorten its runs: read them
            continue
        _runs_from(ordered, max(first, n), n, window, key, found_runs)
        kept[key] = Tail.of(tail.since, ordered, n, window)
    if unread:
        read: dict[tuple[str, str], list[int]] = {key: [] for key in unread}
        wanted = [(key, ends[0] - window) for key, ends in unread.items()]
        for start in range(0, len(wanted), _READ_KEYS):
            chunk = wanted[start:start + _READ_KEYS]
            keys = ", ".join(["(?, ?)"] * len(chunk))
            # Those keys' events from a window before their first new one, found on the time index.
            for tenant_id, api_key_id, end_us in tx.all(
                    f"SELECT e.tenant_id, e.api_key_id, e.end_us FROM {_BY_TIME[tx.dialect]} WHERE e.end_us >="
                    f" {min(lo for _, lo in chunk)} AND e.seq <= {int(end)} AND (e.tenant_id, e.api_key_id) IN"
                    f" (VALUES {keys})", [v for (tenant, key), _ in chunk for v in (tenant, key)]):
                read[(str(tenant_id), str(api_key_id))].append(int(end_us))
        for key, ends in unread.items():
            since = ends[0] - window  # every event of the key from here on is in `ordered`
            ordered = sorted(e for e in read[key] if e >= since)
            _runs_from(ordered, max(bisect.bisect_left(ordered, ends[0]), n), n, window, key, found_runs)
            kept[key] = Tail.of(since, ordered, n, window)
    rows: list[Row] = [(hour, tenant_id, api_key_id, latest, earliest)
                       for (hour, tenant_id, api_key_id), (latest, earliest) in found_runs.items()]
    return Step(stored, held, end, rows, tails=kept, read_back=len(unread))


def _runs_from(ordered: list[int], begin: int, n: int, window: int, key: tuple[str, str],
               into: dict[tuple[int, str, str], list[int]]) -> None:
    """Into `into`, per (hour of the first request, tenant, key): the latest first and earliest last request
    of the runs ending at `ordered[begin:]`, each run's first request its last's `n`-th predecessor."""
    tenant_id, api_key_id = key
    for i in range(begin, len(ordered)):
        last, first = ordered[i], ordered[i - n]
        if last - first < window:
            found = into.get((hour := first // _HOUR * _HOUR, tenant_id, api_key_id))
            if found is None:
                into[(hour, tenant_id, api_key_id)] = [first, last]
            else:
                found[0], found[1] = max(found[0], first), min(found[1], last)


@dataclass(frozen=True)
class Tail:
    """A key's latest end times, sorted: every one of its events after `since` (up to the tails' seq).
    A run ending at `t` whose first request is not among them starts at `since` or before, so it is no run
    (under the rule) once `t - since` is at least the window."""
    since: int
    ends: tuple[int, ...]

    @staticmethod
    def of(since: int, ordered: list[int], n: int, window: int) -> Tail:
        """The tail a later step needs of `ordered` (every event of the key after `since`): the events
        within two windows of the latest (so an event up to a window late still finds every run it
        shortens) and at most `2 n` of them (so up to `n` late events of a busy key do)."""
        begin = 0
        if since < ordered[-1] - 2 * window:
            since = ordered[-1] - 2 * window
            begin = bisect.bisect_left(ordered, since)
        if len(ordered) - begin > 2 * n:  # events at `since` may go: they are no later than any run's first
            begin = len(ordered) - 2 * n
            since = ordered[begin]
        return Tail(since, tuple(ordered[begin:]))


class Tails:
    """Each key's `Tail` as of the burst table's seq, for the rule it was built for: billing's roller keeps
    them between steps (`step` reads them, `adopt` takes a written step's), so a step of a busy ledger
    reads only its own events. They serve only the step that starts at their seq; any other starts over."""

    def __init__(self, keys: int = TAIL_KEYS) -> None:
        self._max = keys
        self._at: tuple[Rule, int] | None = None
        self._tails: OrderedDict[tuple[str, str], Tail] = OrderedDict()

    def at(self, rule: Rule, seq: int) -> Mapping[tuple[str, str], Tail]:
        return self._tails if self._at == ((int(rule[0]), int(rule[1])), seq) else {}

    def adopt(self, found: Step) -> None:
        """After `apply` wrote `found`: the tails as of its end (the least recently moved keys dropped)."""
        if found.rebuilt_for is not None or self._at != (found.rule, found.held):
            self._tails.clear()
        self._at = (found.rebuilt_for or found.rule, found.end)
        for key, tail in (found.tails or {}).items():
            self._tails[key] = tail
            self._tails.move_to_end(key)
        while len(self._tails) > self._max:
            self._tails.popitem(last=False)

    def __len__(self) -> int:
        return len(self._tails)


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
