"""Hourly usage rollups, one table per report shape, rolled forward from the events and always exact.

Each table holds requests, tokens, cached requests and cost per hour of the events' end time
(`hour_us = end_us - end_us % 1 h`, UTC) and a few dimensions, so a report reads about as many rows as it
has groups per hour rather than one per event:

- `usage_hours_by_model`: (hour, tenant, model, version, status, source): reports by any of these;
- `usage_hours_by_key`: (hour, tenant, api key): reports by key, and the anomaly rules' hourly counts;
- `usage_hours_by_tag`: (hour, tenant, tag key, tag value), one row per tag an event carries: reports by
  tag (an event without the tag is the total less those with it);
- `usage_key_groups`: which (tenant, model, version, status, tag set, source) each key had events in per
  hour, without sums, keyed by key first: the groups of a report a flagged key counted in;
- `usage_days_by_key`: (UTC day, tenant, api key): the hours of that day with the key's events, its requests
  and cost, so the spend rule's seven days of history read a row per key and day, not per hour.

The tables cover exactly the events up to `rollup_mark.seq` (`mark`). `roll` adds the events recorded
since, in one transaction with the new mark, set-based in SQL (a few thousand upserts for a second of a busy
ledger, where folding each ingested batch in its own commit costs a row per group per batch); billing rolls
every second (`service.run_rollup_roller`). On SQLite the roller sums the events on a read snapshot first
(`group`, the roll's costliest step: a sort of every event), beside the writer, and the roll only folds
those sums in, while the mark is still where the snapshot saw it. A report reads the tables and, for the
same hours, the few events after the mark, in one snapshot, so it equals a scan of the events whenever it runs. On
PostgreSQL, where concurrent writers take seqs out of commit order, every ingesting transaction holds
`ROLL_LOCK` shared (`hold_off_roll`) and `roll` takes it exclusively for as long as it reads the largest
seq: it waits for the transactions in flight, so no event below its mark can commit after it; rollers
take turns on the mark's row. Migration 5 built the tables from the events
already recorded (`backfill`, also `rebuild`). The same roll keeps the burst rule's table
(`usage_key_bursts`, services/billing/bursts.py) for the events it rolls.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from services.billing import bursts
from services.billing.store.base import Row, Tx

HOUR_US = 3_600_000_000
DAY_US = 24 * HOUR_US
SUM_COLUMNS = "requests, prompt_tokens, completion_tokens, cached_requests, cost_micros"
BY_MODEL, BY_KEY, BY_TAG, KEY_GROUPS = "usage_hours_by_model", "usage_hours_by_key", "usage_hours_by_tag", \
    "usage_key_groups"
BY_KEY_DAYS = "usage_days_by_key"
KEYS = {BY_MODEL: "hour_us, tenant_id, model, model_version, status, source",
        BY_KEY: "hour_us, tenant_id, api_key_id",
        BY_TAG: "hour_us, tenant_id, tag_key, tag_value",
        KEY_GROUPS: "api_key_id, hour_us, tenant_id, model, model_version, status, tags_json, source"}
_HOUR = "end_us / 3600000000 * 3600000000"
# What each key column is in `events` (a tag's key and value come from its tag set, per dialect).
_FROM_EVENTS = {"hour_us": _HOUR, "tag_key": "t.key", "tag_value": "t.value"}
TAG_PAIRS = {"sqlite": "events, json_each(events.tags_json) AS t",
             "postgres": "events CROSS JOIN LATERAL jsonb_each_text(events.tags_json::jsonb) AS t"}
# The events after a mark, walked by seq: SQLite's planner would rather scan an index in GROUP BY order.
EVENTS_BY_SEQ = {"sqlite": "events NOT INDEXED", "postgres": "events"}
ROLLING_TAGS = {dialect: pairs.replace("events", "rolling") for dialect, pairs in TAG_PAIRS.items()}

# The migration's backfill of the hourly table it replaced (migration 4, kept as it shipped).
BACKFILL = ("INSERT INTO usage_hours (hour_us, tenant_id, api_key_id, model, model_version, status, tags_json,"
            " source, requests, prompt_tokens, completion_tokens, cached_requests, cost_micros)"
            " SELECT end_us / 3600000000 * 3600000000, tenant_id, api_key_id, model, model_version, status, tags_json,"
            " source,"
            " COUNT(*), SUM(prompt_tokens), SUM(completion_tokens), SUM(cached), SUM(cost_micros) FROM events"
            " GROUP BY end_us / 3600000000 * 3600000000, tenant_id, api_key_id, model, model_version, status, tags_json,"
            " source")


# A key's day counts an hour once, when the hour's first events roll in: the groups of `rolling` whose (hour,
# tenant, key) the hourly table does not hold yet (so this runs before the hourly table's upsert).
DAYS_ROLL = (f"INSERT INTO {BY_KEY_DAYS} (day_us, tenant_id, api_key_id, hours, requests, cost_micros)"
             f" SELECT hour_us / {DAY_US} * {DAY_US}, tenant_id, api_key_id, SUM(CASE WHEN EXISTS (SELECT 1 FROM"
             f" {BY_KEY} AS b WHERE b.hour_us = g.hour_us AND b.tenant_id = g.tenant_id AND b.api_key_id ="
             f" g.api_key_id) THEN 0 ELSE 1 END), SUM(requests), SUM(cost_micros) FROM (SELECT hour_us, tenant_id,"
             f" api_key_id, SUM(requests) AS requests, SUM(cost_micros) AS cost_micros FROM rolling GROUP BY"
             f" hour_us, tenant_id, api_key_id) AS g WHERE true GROUP BY hour_us / {DAY_US} * {DAY_US}, tenant_id,"
             f" api_key_id ORDER BY 1, 2, 3 ON CONFLICT (day_us, tenant_id, api_key_id) DO UPDATE SET"
             f" hours = {BY_KEY_DAYS}.hours + excluded.hours, requests = {BY_KEY_DAYS}.requests + excluded.requests,"
             f" cost_micros = {BY_KEY_DAYS}.cost_micros + excluded.cost_micros")
# Migration 7's backfill of the daily table from the hourly one.
DAYS_BACKFILL = (f"INSERT INTO {BY_KEY_DAYS} (day_us, tenant_id, api_key_id, hours, requests, cost_micros)"
                 f" SELECT hour_us / {DAY_US} * {DAY_US}, tenant_id, api_key_id, COUNT(*), SUM(requests),"
                 f" SUM(cost_micros) FROM {BY_KEY} GROUP BY hour_us / {DAY_US} * {DAY_US}, tenant_id, api_key_id")


_GROUP_SUMS = ("COUNT(*) AS requests, SUM(prompt_tokens) AS prompt_tokens, SUM(completion_tokens) AS"
               " completion_tokens, SUM(cached) AS cached_requests, SUM(cost_micros) AS cost_micros")


def _grouping(where: str) -> str:
    """The events matching `where` summed per key group and hour: the rows of the temporary table `rolling`."""
    groups = KEYS[KEY_GROUPS]
    from_events = ", ".join(_FROM_EVENTS.get(k, k) for k in groups.split(", "))
    return f"SELECT {_aliased(groups)}, {_GROUP_SUMS} FROM events WHERE {where} GROUP BY {from_events}"


def _statements(rolling_tags: str, where: str, days: bool = True) -> list[str]:
    """The statements adding the events matching `where` to every rollup table: summed once per key group
    and hour into a temporary table (one pass over the events), which each table sums further.
    `rolling_tags`: the dialect's spelling of that table joined with its rows' tags (`ROLLING_TAGS`);
    `days`: with the daily table and the key-tenant pairs (migration 5's backfill ran before they existed)."""
    return [f"CREATE TEMP TABLE rolling AS {_grouping(where)}", *_folding(rolling_tags, days)]


def _folding(rolling_tags: str, days: bool = True) -> list[str]:
    """The statements adding the groups of the temporary table `rolling` to every rollup table, then
    dropping it (`_statements`)."""
    groups = KEYS[KEY_GROUPS]
    out = [DAYS_ROLL] if days else []
    sums = ", ".join(f"SUM({c})" for c in SUM_COLUMNS.split(", "))
    for table in (BY_MODEL, BY_KEY, BY_TAG):
        keys = KEYS[table]
        selected = keys.replace("tag_key", "t.key").replace("tag_value", "t.value")
        update = ", ".join(f"{c} = {table}.{c} + excluded.{c}" for c in SUM_COLUMNS.split(", "))
        out.append(f"INSERT INTO {table} ({keys}, {SUM_COLUMNS}) SELECT {selected}, {sums}"
                   f" FROM {rolling_tags if table == BY_TAG else 'rolling'} WHERE true GROUP BY {selected}"
                   f" ORDER BY {selected} ON CONFLICT ({keys}) DO UPDATE SET {update}")
    out.append(f"INSERT INTO {KEY_GROUPS} ({groups}) SELECT {groups} FROM rolling WHERE true ORDER BY {groups}"
               f" ON CONFLICT ({groups}) DO NOTHING")
    if days:  # the (key, tenant) pairs seen (services/billing/bursts.py), from the groups, not the events again
        out.append(f"INSERT INTO {bursts.KEY_TENANTS} (api_key_id, tenant_id) SELECT DISTINCT api_key_id, tenant_id"
                   f" FROM rolling WHERE true ORDER BY 1, 2 ON CONFLICT DO NOTHING")
    out.append("DROP TABLE rolling")
    return out


def _aliased(columns: str) -> str:
    return ", ".join(f"{_FROM_EVENTS[c]} AS {c}" if c in _FROM_EVENTS else c for c in columns.split(", "))


def backfill(rolling_tags: str, days: bool = True) -> list[str]:
    """The statements that fill every rollup table from the events already in the ledger; `rolling_tags`
    is the dialect's spelling of the summed events joined with their tags (`ROLLING_TAGS`); `days`: the
    daily table too."""
    return _statements(rolling_tags, "true", days)


ROLL_LOCK = 0x726F6C6C  # the advisory lock key of rolling (PostgreSQL)
ROLL_LIMIT = 500_000  # events per roll at most: one roll's transaction stays short behind a long backlog


def tags_json(tags: dict[str, str]) -> str:
    """The one spelling of a tag set, in events and rollups alike."""
    return json.dumps(tags, sort_keys=True) if tags else "{}"


def mark(tx: Tx) -> int:
    """The seq of the last event the rollups hold."""
    row = tx.one("SELECT seq FROM rollup_mark WHERE id = 1")
    return int(row[0]) if row is not None else 0


def hold_off_roll(tx: Tx) -> None:
    """Called by a transaction before it inserts events: no roll runs until it ends (PostgreSQL)."""
    if tx.dialect == "postgres":
        tx.one("SELECT pg_advisory_xact_lock_shared(?)", [ROLL_LOCK])


def _roll_end(tx: Tx, start: int, limit: int) -> int:
    """The last seq a roll from `start` takes: the largest recorded, at most `limit` past `start`."""
    top = tx.one("SELECT MAX(seq) FROM events")
    return min(int(top[0]), start + limit) if top is not None and top[0] is not None else start


@dataclass(frozen=True)
class Grouped:
    """The events of seqs (start, end] summed per key group and hour on a read snapshot (`group`): `roll`
    folds them in when the mark is still `start`."""

    start: int
    end: int
    rows: list[Row]


def group(tx: Tx, limit: int = ROLL_LIMIT) -> Grouped | None:
    """On a read snapshot, beside the writer: the events recorded since the mark, summed as `roll` sums them
    (the roll's costliest step, a sort of every event). None when there is nothing to roll, and on
    PostgreSQL, whose seqs settle only under `ROLL_LOCK` (`roll` sums them itself there)."""
    if tx.dialect == "postgres":
        return None
    start = mark(tx)
    end = _roll_end(tx, start, limit)
    if end <= start:
        return None
    return Grouped(start, end, tx.all(_grouping(f"seq > {int(start)} AND seq <= {int(end)}")))


def roll(tx: Tx, limit: int = ROLL_LIMIT, rule: bursts.Rule | None = None, with_bursts: bool = True,
         grouped: Grouped | None = None) -> int:
    """Add the events recorded since the mark to the rollups and the burst starts and move the mark past
    them; returns how many seqs it moved (0 when there was nothing to roll). `rule`: billing's burst rule
    (max_requests, window_s); when the burst table was built for another, it is rebuilt for this one;
    `with_bursts=False`: leave the burst starts to `bursts.step` and `bursts.apply` (billing's roller);
    `grouped`: those events already summed on a read snapshot (`group`), used while the mark is still its
    start (else the roll sums the events itself)."""
    if tx.dialect == "postgres":
        start = int(tx.one("SELECT seq FROM rollup_mark WHERE id = 1 FOR UPDATE")[0])  # type: ignore[index]
        # Once no ingesting transaction is in flight, every seq up to the largest committed one is settled
        # for good (later writers draw larger ones): hold the lock only to read it, not for the roll.
        tx.one("SELECT pg_advisory_lock(?)", [ROLL_LOCK])
        try:
            end = _roll_end(tx, start, limit)
        finally:
            tx.one("SELECT pg_advisory_unlock(?)", [ROLL_LOCK])
    else:
        start = mark(tx)
        end = _roll_end(tx, start, limit)
    keep = bursts.keep if with_bursts else bursts.follow
    if grouped is not None and grouped.start == start:
        end = grouped.end  # events are never changed once committed, and SQLite commits seqs in order
        columns = f"{KEYS[KEY_GROUPS]}, {SUM_COLUMNS}"
        tx.execute(f"CREATE TEMP TABLE rolling ({columns})")
        tx.executemany(f"INSERT INTO rolling ({columns}) VALUES ({', '.join('?' * len(columns.split(', ')))})",
                       grouped.rows)
        statements = _folding(ROLLING_TAGS[tx.dialect])
    elif end > start:  # the seqs spelled out: PostgreSQL binds no parameters in CREATE TABLE AS
        statements = _statements(ROLLING_TAGS[tx.dialect], f"seq > {int(start)} AND seq <= {int(end)}")
    else:
        keep(tx, start, rule)
        return 0
    for statement in statements:
        tx.execute(statement)
    keep(tx, end, rule)
    tx.execute("UPDATE rollup_mark SET seq = ? WHERE id = 1", [end])
    return end - start


def rebuild(tx: Tx, rule: bursts.Rule | None = None) -> None:
    """Recompute every rollup and the burst starts (for `rule`, else the table's) from the events (after a
    bulk load), up to the last event."""
    for table in (BY_MODEL, BY_KEY, BY_TAG, KEY_GROUPS, BY_KEY_DAYS, bursts.KEY_TENANTS):
        tx.execute(f"DELETE FROM {table}")
    for statement in backfill(ROLLING_TAGS[tx.dialect]):
        tx.execute(statement)
    tx.execute("UPDATE rollup_mark SET seq = (SELECT COALESCE(MAX(seq), 0) FROM events) WHERE id = 1")
    stored = bursts.state(tx)
    if stored is not None:
        bursts.rebuild(tx, rule or stored[0], mark(tx))


__all__ = ["BACKFILL", "BY_KEY", "BY_KEY_DAYS", "BY_MODEL", "BY_TAG", "DAYS_BACKFILL", "DAY_US", "EVENTS_BY_SEQ",
           "HOUR_US", "KEY_GROUPS", "ROLLING_TAGS", "ROLL_LOCK", "TAG_PAIRS", "Grouped", "backfill", "group",
           "hold_off_roll", "mark", "rebuild", "roll", "tags_json"]
