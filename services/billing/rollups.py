"""Hourly usage rollups: one row per (hour, tenant, key, model, version, status, tag set, source), kept exact.

`usage_hours` holds requests, tokens, cached requests and cost per hour of the events' end time
(`hour_us = end_us - end_us % 1 h`, UTC). The ingester adds every first-time event to it in the same
transaction that inserts the event row (`add`), so the rollups and the ledger always agree; migration 4
built it from the events already recorded (`BACKFILL`, also `rebuild`). Reports read whole hours from here
and only their partial edge hours from the events (`reports`).

Rows are upserted in primary-key order (PostgreSQL writers touching the same hours wait for each other in
one order rather than deadlock), one multi-row statement per chunk, after summing the batch in Python.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import TYPE_CHECKING

from services.billing.store.base import Tx

if TYPE_CHECKING:
    from services.billing.model import UsageEvent

HOUR_US = 3_600_000_000
KEY_COLUMNS = "hour_us, tenant_id, api_key_id, model, model_version, status, tags_json, source"
SUM_COLUMNS = "requests, prompt_tokens, completion_tokens, cached_requests, cost_micros"
ROWS_PER_UPSERT = 200  # 13 parameters a row
_MARKS = "(" + ", ".join("?" * 13) + ")"
_UPDATE = ", ".join(f"{c} = usage_hours.{c} + excluded.{c}" for c in SUM_COLUMNS.split(", "))

# The migration's (and `rebuild`'s) backfill: the same sums, from the events already in the ledger.
BACKFILL = (f"INSERT INTO usage_hours ({KEY_COLUMNS}, {SUM_COLUMNS})"
            " SELECT end_us / 3600000000 * 3600000000, tenant_id, api_key_id, model, model_version, status, tags_json,"
            " source,"
            " COUNT(*), SUM(prompt_tokens), SUM(completion_tokens), SUM(cached), SUM(cost_micros) FROM events"
            " GROUP BY end_us / 3600000000 * 3600000000, tenant_id, api_key_id, model, model_version, status, tags_json,"
            " source")


def tags_json(tags: dict[str, str]) -> str:
    """The one spelling of a tag set, in events and rollups alike."""
    return json.dumps(tags, sort_keys=True) if tags else "{}"


def add(tx: Tx, new: Sequence[tuple[UsageEvent, int]]) -> None:
    """Add these first-time (event, cost) pairs to their hours' rollups, in the caller's transaction."""
    sums: dict[tuple[int, str, str, str, str, int, str, int], list[int]] = {}
    spelled: dict[tuple[tuple[str, str], ...], str] = {(): "{}"}  # a batch has few tag sets: spell each once
    for event, cost in new:
        tag_set = tuple(sorted(event.tags.items())) if event.tags else ()
        text = spelled.get(tag_set)
        if text is None:
            text = spelled[tag_set] = tags_json(event.tags)
        key = (event.end_us - event.end_us % HOUR_US, event.tenant_id, event.api_key_id, event.model,
               event.model_version, int(event.status), text, int(event.source))
        row = sums.get(key)
        if row is None:
            sums[key] = [1, event.prompt_tokens, event.completion_tokens, int(event.cached), cost]
        else:
            row[0] += 1
            row[1] += event.prompt_tokens
            row[2] += event.completion_tokens
            row[3] += int(event.cached)
            row[4] += cost
    ordered = sorted(sums.items())
    for start in range(0, len(ordered), ROWS_PER_UPSERT):
        chunk = ordered[start:start + ROWS_PER_UPSERT]
        params: list[object] = []
        for key, values in chunk:
            params += (*key, *values)
        tx.execute(f"INSERT INTO usage_hours ({KEY_COLUMNS}, {SUM_COLUMNS}) VALUES {', '.join([_MARKS] * len(chunk))}"
                   f" ON CONFLICT ({KEY_COLUMNS}) DO UPDATE SET {_UPDATE}", params)


def rebuild(tx: Tx) -> None:
    """Recompute every rollup from the events (after a bulk load that bypassed the ingester)."""
    tx.execute("DELETE FROM usage_hours")
    tx.execute(BACKFILL)


__all__ = ["BACKFILL", "HOUR_US", "add", "rebuild", "tags_json"]
