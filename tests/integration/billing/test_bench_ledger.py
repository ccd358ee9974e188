"""The billing bench's SQL bulk loader, on real SQLite and PostgreSQL: every row is what billing would have
recorded (cost, tag spelling, key profile, time), the ledger's distribution is the Python generator's
(tenants, keys, statuses, models, tokens), and reports from the rollups it rebuilds equal a scan of its
events to the micro-unit."""

from __future__ import annotations

import bisect
import time
from collections import Counter
from collections.abc import Sequence

from bench.billing.ledger import DAY_US, MODELS, bulk_load, cost_of, key_profile, python_events
from bench.billing.reports import open_billing
from services.billing import reports, rollups
from services.billing.ledger import EVENT_COLUMNS
from services.common.usage import UsageStatus

COUNT = 20_000
PER_DAY = 20_000  # a day of events: the rollups hold 24 whole hours of them
COLUMNS = EVENT_COLUMNS.replace(" ", "").split(",")


def shares(values: Sequence[object]) -> dict[object, float]:
    return {value: n / len(values) for value, n in Counter(values).items()}


def largest_gap(a: dict[object, float], b: dict[object, float]) -> float:
    return max(abs(a.get(k, 0.0) - b.get(k, 0.0)) for k in a.keys() | b.keys())


def ks_distance(a: list[int], b: list[int]) -> float:
    """The two samples' largest CDF difference over the key numbers."""
    a, b = sorted(a), sorted(b)
    return max(abs(bisect.bisect_right(a, k) / len(a) - bisect.bisect_right(b, k) / len(b)) for k in range(1000))


async def test_the_sql_loader_makes_the_python_generators_ledger_and_rollups_equal_to_a_scan(database: str) -> None:
    now_us = time.time_ns() // 1000
    billing = await open_billing(database)
    try:
        loaded = await bulk_load(billing.store, COUNT, now_us, lambda _: None, per_day=PER_DAY)
        rows = [dict(zip(["seq", *COLUMNS], r, strict=True)) for r in await billing.store.read(
            lambda tx: tx.all(f"SELECT seq, {EVENT_COLUMNS} FROM events ORDER BY seq"))]
        assert loaded.events == COUNT and len(rows) == COUNT
        assert ("vacuum_analyze" in loaded.seconds) == (billing.store.dialect == "postgres")
        # Every row as billing would have recorded it.
        span, step = DAY_US, DAY_US // COUNT
        assert [r["event_id"] for r in rows] == [f"e{n}" for n in range(COUNT)]  # unique, in time order
        keys = []
        for n, r in enumerate(rows):
            key = int(str(r["api_key_id"]).removeprefix("key"))
            tenant, key_id, tags = key_profile(key)
            keys.append(key)
            assert (r["tenant_id"], r["api_key_id"], r["tags_json"]) == (tenant, key_id, rollups.tags_json(tags))
            assert r["model"] in (MODELS[key % 4], MODELS[(key + 1) % 4]) and r["model_version"] == f"v{key % 2 + 1}"
            assert 20 <= r["prompt_tokens"] <= 2000 and 1 <= r["completion_tokens"] <= 800 and r["cached"] in (0, 1)
            assert r["cost_micros"] == cost_of(r["prompt_tokens"], r["completion_tokens"])
            assert now_us - span + n * step <= r["end_us"] < now_us - span + n * step + 1000
            assert r["start_us"] == r["end_us"] - 900_000
            assert (r["status"], r["traffic_class"], r["currency"], r["recorded_us"], r["source"]) in {
                (int(s), 0, "USD", now_us, 1) for s in UsageStatus if s}
            assert (r["request_id"], r["trace_id"]) == ("", "")
        assert max(r["end_us"] for r in rows) < now_us

        # The same distribution as the Python generator's.
        python = python_events(COUNT, now_us, per_day=PER_DAY)
        python_keys = [int(e.api_key_id.removeprefix("key")) for e in python]
        assert ks_distance(keys, python_keys) < 0.02
        assert largest_gap(shares([r["tenant_id"] for r in rows]), shares([e.tenant_id for e in python])) < 0.006
        top = [k for k, _ in Counter(python_keys).most_common(5)]
        assert largest_gap(shares([k for k in keys if k in top]), shares([k for k in python_keys if k in top])) < 0.05
        assert largest_gap(shares([r["status"] for r in rows]), {1: 47 / 50, 2: 2 / 50, 3: 1 / 50}) < 0.006
        assert largest_gap(shares([r["status"] for r in rows]), shares([int(e.status) for e in python])) < 0.006
        assert largest_gap(shares([r["tags_json"] for r in rows]),
                           shares([rollups.tags_json(e.tags) for e in python])) < 0.01
        assert largest_gap(shares([r["model"] for r in rows]), shares([e.model for e in python])) < 0.015
        assert largest_gap(shares([r["model"] == MODELS[k % 4] for r, k in zip(rows, keys, strict=True)]),
                           {True: 0.5, False: 0.5}) < 0.02
        assert abs(sum(r["cached"] for r in rows) / COUNT - sum(e.cached for e in python) / COUNT) < 0.006
        for column in ("prompt_tokens", "completion_tokens"):
            mine, theirs = sum(r[column] for r in rows) / COUNT, sum(getattr(e, column) for e in python) / COUNT
            assert abs(mine - theirs) / theirs < 0.02, column

        # Reports from the rebuilt rollups equal a scan of the events, whole hours and edges alike.
        for group_by in (("tenant",), ("model", "tenant"), ("tag",), ("api_key",), ("status", "model_version")):
            for start, granularity in ((now_us - 30 * DAY_US, ""), (now_us - DAY_US // 2 - 7, "hour")):
                query = reports.ReportQuery(start, now_us, group_by, tag_key="team", granularity=granularity)
                from_rollups, scanned = await billing.store.read(lambda tx, q=query: (
                    reports.build(tx, q, billing.anomaly_rule, rollups=True),
                    reports.build(tx, q, billing.anomaly_rule, rollups=False)))
                assert from_rollups == scanned, (group_by, granularity)
                assert from_rollups[1].requests > 0
        rolled = await billing.store.read(lambda tx: tx.one(f"SELECT SUM(requests), SUM(cost_micros) FROM {rollups.BY_KEY}"))
        assert rolled is not None and tuple(int(v) for v in rolled) == (COUNT, sum(r["cost_micros"] for r in rows))
    finally:
        await billing.close()
