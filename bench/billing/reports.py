"""Billing reports bench: GetUsageReport latency at 1 M and 10 M ledger events (by tenant, by model+tenant,
by tag; since one day and since thirty days), and ingestion throughput with the hourly rollups against
without them — on SQLite (synchronous=FULL) and a local PostgreSQL (fsync on).

The ledger is filled through the bulk path: event rows inserted straight into `events` in large
transactions, then the rollups rebuilt from them by the migration's backfill (`rollups.rebuild`); the
events are as billing would have priced them. Reports run in-process through `Billing.report` (what the
GetUsageReport servicer calls), on the store's read path; the anchor is the same report scanning the events
alone (`reports.build(..., rollups=False)`, what billing did before rollups), measured once per query at
1 M events. Ingestion runs `Billing.record_many` (what StreamUsage commits, 250 events a batch) on two
fresh databases, one with the rollup roller running as billing's server runs it (`run_rollup_roller`,
every second) and one without, interleaved ABBA.

    python -m bench.billing.reports [--sizes 1000000,10000000] [--no-postgres] [--runs 5]

BENCH_BILLING_SKIP_10M=1 drops the 10 M size (its load takes several minutes on 2 cores); the JSON records
the sizes run. Writes bench/results/billing-reports.json.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import random
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from services.billing import reports, rollups
from services.billing.config import BillingConfig
from services.billing.model import UsageEvent
from services.billing.service import Billing, run_rollup_roller
from services.billing.store import Store, open_store
from services.common.logging import configure_logging
from services.common.pricing import Price
from services.common.usage import UsageStatus

US = 1_000_000
DAY_US = 86_400 * US
EVENTS_PER_DAY = 1_000_000  # the "about a day of a busy deployment"
TENANTS, KEYS, TEAMS = 50, 1000, 8
MODELS = ("smollm2", "qwen", "llama", "phi")
STATUSES = (UsageStatus.COMPLETED,) * 47 + (UsageStatus.CANCELLED,) * 2 + (UsageStatus.FAILED,)
LOAD_CHUNK = 50_000
INGEST_EVENTS, INGEST_BATCH = 20_000, 250
QUERIES = {"tenant": ("tenant",), "model+tenant": ("model", "tenant"), "tag": ("tag",)}
WINDOWS = {"1d": DAY_US, "30d": 30 * DAY_US}


def key_profile(key: int) -> tuple[str, str, dict[str, str]]:
    """A key's tenant, api key id and tags (fixed per key, as a deployment's keys are)."""
    tags = {} if key % 9 == 0 else {"team": f"team{key % TEAMS}"}
    return f"tenant{key % TENANTS}", f"key{key}", tags


def event_at(rng: random.Random, n: int, end_us: int, tag: str) -> UsageEvent:
    key = int(KEYS * rng.random() ** 2)  # a few busy keys, a long tail
    tenant, key_id, tags = key_profile(key)
    model = MODELS[(key + rng.randint(0, 1)) % len(MODELS)]
    return UsageEvent(f"{tag}{n}", tenant, key_id, model, model_version=f"v{key % 2 + 1}", tags=tags,
                      prompt_tokens=rng.randint(20, 2000), completion_tokens=rng.randint(1, 800),
                      cached=rng.random() < 0.05, end_us=end_us, start_us=end_us - 900_000,
                      status=rng.choice(STATUSES))


def row_of(e: UsageEvent, now_us: int) -> tuple[Any, ...]:
    cost = (e.prompt_tokens * 2_000_000 + e.completion_tokens * 6_000_000 + 500_000) // 1_000_000
    return (e.event_id, e.tenant_id, e.api_key_id, e.model, e.model_version, rollups.tags_json(e.tags),
            e.prompt_tokens, e.completion_tokens, int(e.cached), "", "", e.start_us, e.end_us, int(e.status), 0,
            cost, "USD", now_us, 1)  # source 1: metered by the router


async def bulk_load(store: Store, count: int, now_us: int, log: Callable[[str], None]) -> float:
    """`count` events, EVENTS_PER_DAY a day ending at `now_us`, then the rollups; returns seconds taken."""
    from services.billing.ledger import EVENT_COLUMNS

    rng = random.Random(count)
    span = count * DAY_US // EVENTS_PER_DAY
    marks = ", ".join("?" * 19)
    started = time.perf_counter()
    for chunk in range(0, count, LOAD_CHUNK):
        rows = [row_of(event_at(rng, n, now_us - span + n * span // count + rng.randrange(0, 1000), "e"), now_us)
                for n in range(chunk, min(count, chunk + LOAD_CHUNK))]
        await store.write(lambda tx, rows=rows: tx.executemany(f"INSERT INTO events ({EVENT_COLUMNS}) VALUES ({marks})",
                                                               rows))
        if chunk % (10 * LOAD_CHUNK) == 0:
            log(f"  loaded {chunk + len(rows):,} events")
    await store.write(rollups.rebuild)
    return time.perf_counter() - started


async def timed(fn: Callable[[], Awaitable[Any]]) -> float:
    start = time.perf_counter()
    await fn()
    return (time.perf_counter() - start) * 1000


async def report_latency(billing: Billing, now_us: int, runs: int, with_anchor: bool) -> list[dict[str, Any]]:
    out = []
    for window, length in WINDOWS.items():
        for name, group_by in QUERIES.items():
            query = reports.ReportQuery(now_us - length, now_us, group_by, tag_key="team")
            first = await timed(lambda q=query: billing.report(q))  # the first: reads busy keys' events once
            samples = [await timed(lambda q=query: billing.report(q)) for _ in range(runs)]
            rows, total = await billing.report(query)
            row: dict[str, Any] = {"group_by": name, "since": window, "rows": len(rows), "events": total.requests,
                                   "first_ms": round(first, 1), "p50_ms": round(statistics.median(samples), 1),
                                   "max_ms": round(max(samples), 1)}
            if with_anchor:
                row["events_scan_ms"] = round(await timed(lambda q=query: billing.store.read(
                    lambda tx: reports.build(tx, q, billing.anomaly_rule, rollups=False))), 1)
            out.append(row)
    return out


async def ingest_rate(billing: Billing, tag: str, now_us: int) -> float:
    rng = random.Random(tag)
    events = [event_at(rng, n, now_us - 60 * US + n * 1000, tag) for n in range(INGEST_EVENTS)]
    start = time.perf_counter()
    for i in range(0, len(events), INGEST_BATCH):
        outcomes = await billing.record_many(events[i:i + INGEST_BATCH])
        assert not any(isinstance(o, Exception) for o in outcomes)
    return INGEST_EVENTS / (time.perf_counter() - start)


async def open_billing(dsn: str) -> Billing:
    store = open_store(dsn)
    await store.open()
    billing = Billing(store, BillingConfig(database=dsn, operator_token="bench-operator-token-unused"))
    for model in MODELS:
        await billing.create_price(Price("", model, "", 2_000_000, 6_000_000, None, 1), "bench")
    return billing


async def bench_ingest(make_dsn: Callable[[str], str], runs: int) -> dict[str, Any]:
    now_us = time.time_ns() // 1000
    kept, bare = await open_billing(make_dsn("with")), await open_billing(make_dsn("without"))
    roller = asyncio.create_task(run_rollup_roller(kept))  # as billing's server runs it; `bare` has none
    try:
        await ingest_rate(kept, "warm-a", now_us)
        await ingest_rate(bare, "warm-b", now_us)
        with_r: list[float] = []
        without_r: list[float] = []
        for run in range(runs):  # ABBA
            order = [(kept, with_r), (bare, without_r)]
            for billing, into in order if run % 2 == 0 else order[::-1]:
                into.append(await ingest_rate(billing, f"r{run}-", now_us))
    finally:
        roller.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await roller
        await kept.close()
        await bare.close()
    return {"with_rollups_events_per_s": round(statistics.median(with_r), 1),
            "without_rollups_events_per_s": round(statistics.median(without_r), 1),
            "ratio": round(statistics.median(with_r) / statistics.median(without_r), 3),
            "runs_with": [round(r, 1) for r in with_r], "runs_without": [round(r, 1) for r in without_r]}


async def bench_database(name: str, make_dsn: Callable[[str], str], sizes: list[int], runs: int,
                         log: Callable[[str], None]) -> dict[str, Any]:
    result: dict[str, Any] = {"database": name, "reports": {}}
    for size in sizes:
        dsn = make_dsn(f"r{size}")
        now_us = time.time_ns() // 1000
        billing = await open_billing(dsn)
        try:
            log(f"{name}: loading {size:,} events")
            load_s = await bulk_load(billing.store, size, now_us, log)
            log(f"{name}: loaded in {load_s:.0f} s; reports")
            result["reports"][str(size)] = {"load_s": round(load_s, 1), "queries": await report_latency(
                billing, now_us, runs, with_anchor=size <= 1_000_000)}
        finally:
            await billing.close()
    log(f"{name}: ingestion with and without rollups")
    result["ingest"] = await bench_ingest(make_dsn, runs)
    return result


def targets(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for r in results:
        if "skipped" in r:
            continue
        for size, measured in r["reports"].items():
            limit = 200 if int(size) <= 1_000_000 else 500
            for q in measured["queries"]:
                anchor = (f"the same report scanning the events: {q['events_scan_ms']} ms"
                          if "events_scan_ms" in q else "scan of the events not run at this size")
                rows.append({"name": f"report by {q['group_by']} since {q['since']}, {int(size):,} events, "
                                     f"{r['database']} (ms, p50)", "measured": q["p50_ms"], "target": limit,
                             "better": "lower", "anchor": anchor})
        ingest = r["ingest"]
        rows.append({"name": f"ingestion with rollups / without, {r['database']}", "measured": ingest["ratio"],
                     "target": 0.9, "better": "higher",
                     "anchor": f"{ingest['without_rollups_events_per_s']} events/s without rollups, "
                               f"{ingest['with_rollups_events_per_s']} with, same run"})
    return rows


async def main(sizes: list[int], runs: int, with_postgres: bool, label: str) -> dict[str, Any]:
    configure_logging("bench", "WARNING")

    def log(line: str) -> None:
        print(line, flush=True)

    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench-billing-reports-") as tmp:
        results.append(await bench_database("sqlite", lambda n: f"sqlite:///{Path(tmp) / n}.sqlite3", sizes, runs, log))
        try:
            if not with_postgres:
                raise RuntimeError("--no-postgres")
            from tests.integration.billing.conftest import postgres

            gen = postgres.__wrapped__()  # type: ignore[attr-defined]
            server = next(gen)
            try:
                results.append(await bench_database("postgres", lambda n: server.create_database(), sizes, runs, log))
            finally:
                next(gen, None)
        except (Exception, pytest.skip.Exception, pytest.fail.Exception) as exc:  # report what ran; say why not
            results.append({"database": "postgres", "skipped": str(exc)})
    doc = {
        "benchmark": "billing-reports",
        "label": label,
        "machine": {"python": platform.python_version(), "cpu_count": os.cpu_count(), "platform": platform.platform(),
                    "load_average_at_end": list(os.getloadavg())},
        "settings": {"sizes": sizes, "skip_10m": os.environ.get("BENCH_BILLING_SKIP_10M", ""), "runs": runs,
                   "events_per_day": EVENTS_PER_DAY, "tenants": TENANTS, "api_keys": KEYS,
                   "key_popularity": "key = int(1000 * u**2), u uniform", "tag_values": TEAMS,
                   "models": len(MODELS), "versions_per_model": 2, "ingest_events": INGEST_EVENTS,
                   "ingest_batch": INGEST_BATCH, "load": "bulk: rows inserted into events directly, "
                   f"{LOAD_CHUNK} a transaction, then rollups.rebuild (the migration's backfill)"},
        "method": "reports in-process through Billing.report on the store's read path (what GetUsageReport runs), "
                  "windows ending now (not on an hour), p50 of the runs after the first (first_ms: the first report of that window in a fresh process, which reads the busy keys' events for the burst rule once); the anchor at 1 M is "
                  "reports.build(rollups=False), the events scan billing ran before rollups. Ingestion: "
                  "Billing.record_many of 250-event batches (what a StreamUsage batch commits) into two fresh "
                  "databases, one with the rollup roller running (every second, as billing's server runs it) and "
                  "one without, interleaved ABBA, median of the runs",
        "results": {r["database"]: r for r in results},
        "units": {"*_ms": "milliseconds", "*_events_per_s": "events/s", "load_s": "seconds", "ratio": "with / without"},
        "targets": targets(results),
    }
    return doc


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=Path("bench/results/billing-reports.json"))
    parser.add_argument("--sizes", default="1000000,10000000", help="ledger sizes, comma-separated")
    parser.add_argument("--runs", type=int, default=5, help="runs per report query and ingestion mode")
    parser.add_argument("--no-postgres", action="store_true", help="measure SQLite only")
    parser.add_argument("--label", default="", help="recorded in the JSON, e.g. the machine's load")
    args = parser.parse_args()
    chosen = [int(s) for s in args.sizes.split(",") if s]
    if os.environ.get("BENCH_BILLING_SKIP_10M"):
        chosen = [s for s in chosen if s < 10_000_000]
    result = asyncio.run(main(chosen, args.runs, not args.no_postgres, args.label))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["targets"], indent=2))
