"""Console page latency: `autoglm up` (as `make run` starts it) with --events usage events (10,000 by
default: 10 tenants, 50 keys, 5 tags, over the last 20 hours) streamed into billing, then every console page
and JSON endpoint loaded --loads times over HTTPS with a signed-in session; writes bench/results/console.json
(`results`: median and p95 per path; `targets`: the slowest median and p95 against 300 ms) and console.png.

    python -m bench.console.bench_console [--events 10000] [--loads 20]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import ssl
import statistics
import subprocess
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import httpx
from google.protobuf.timestamp_pb2 import Timestamp

from autoglm.billing.v1 import billing_service_pb2 as pb2
from autoglm.billing.v1 import billing_service_pb2_grpc as pb2_grpc
from autoglm.common.v1 import money_pb2
from services.cli.endpoint import billing_token, load_endpoint, operator_channel
from tests.e2e.mesh_process import start_mesh, stop_mesh

RESULTS = Path(__file__).resolve().parents[1] / "results"
TARGET_MS = 300.0
MODEL = "smollm2-135m-instruct"
PATHS = ("/console/spend", "/console/api/spend?by=tenant&since=24h&granularity=hour",
         "/console/api/spend?by=model&since=24h&granularity=hour",
         "/console/api/spend?by=tag&tag_key=team&since=24h&granularity=hour",
         "/console/api/spend?by=key&since=7d&granularity=day",
         "/console/api/spend.csv?by=tenant&since=24h&granularity=hour", "/console/budgets", "/console/keys",
         "/console/models", "/console/audit", "/console/audit?source=billing", "/console/live", "/console/api/live")


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _event(rng: random.Random, now: datetime) -> pb2.UsageEvent:
    end = now - timedelta(seconds=rng.randint(0, 20 * 3600))
    start_ts, end_ts = Timestamp(), Timestamp()
    start_ts.FromDatetime(end - timedelta(seconds=1))
    end_ts.FromDatetime(end)
    return pb2.UsageEvent(event_id=uuid.uuid4().hex, tenant_id=f"tenant-{rng.randint(0, 9)}",
                          api_key_id=f"key_{rng.randint(0, 49):016d}", model=MODEL, model_version="bench",
                          tags={"team": f"team-{rng.randint(0, 4)}"}, prompt_tokens=rng.randint(10, 500),
                          completion_tokens=rng.randint(10, 300), start_time=start_ts, end_time=end_ts,
                          status=pb2.USAGE_STATUS_COMPLETED, traffic_class=2, request_id=uuid.uuid4().hex)


async def ingest(billing: str, token: str, events: int, seed: int = 7) -> int:
    rng, now = random.Random(seed), datetime.now(UTC)
    price = pb2.Price(model=MODEL, model_version="bench",
                      input_per_million=money_pb2.Money(currency_code="USD", micros=50_000),
                      output_per_million=money_pb2.Money(currency_code="USD", micros=100_000))
    price.effective_time.FromDatetime(now - timedelta(days=2))  # in force for the events' past 20 hours
    async with operator_channel(billing, token) as channel:
        await pb2_grpc.BillingServiceStub(channel).CreatePrice(pb2.CreatePriceRequest(price=price, actor="bench"),
                                                               timeout=30)
    batches = [pb2.StreamUsageRequest(events=[_event(rng, now) for _ in range(min(100, events - i))])
               for i in range(0, events, 100)]

    async def requests():  # type: ignore[no-untyped-def]
        for batch in batches:
            yield batch

    acked = 0
    async with grpc.aio.insecure_channel(billing) as channel:
        async for reply in pb2_grpc.BillingServiceStub(channel).StreamUsage(requests()):
            for ack in reply.acks:
                if ack.error_code:
                    raise SystemExit(f"billing refused a usage event: {ack.error_code}: {ack.error_message}")
                acked += 1
    return acked


def time_pages(base: str, ca: str, token: str, loads: int) -> dict[str, list[float]]:
    timings: dict[str, list[float]] = {}
    with httpx.Client(base_url=base, verify=ssl.create_default_context(cafile=ca), timeout=30) as client:
        client.post("/console/api/session", json={"token": token}).raise_for_status()
        for path in PATHS:
            client.get(path).raise_for_status()  # one warm-up load
            for _ in range(loads):
                started = time.perf_counter()
                client.get(path).raise_for_status()
                timings.setdefault(path, []).append((time.perf_counter() - started) * 1000)
    return timings


def plot(results: dict[str, dict[str, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    fig, ax = plt.subplots(figsize=(10, 5))
    ax.barh(names, [results[n]["p95_ms"] for n in names], color="#c9d3e6", label="p95")
    ax.barh(names, [results[n]["median_ms"] for n in names], color="#2f6fde", label="median")
    ax.axvline(TARGET_MS, color="#c0392b", linestyle="--", label=f"target {TARGET_MS:.0f} ms")
    ax.invert_yaxis()
    ax.set_xlabel("ms per load (HTTPS, signed in)")
    ax.set_title("Console page latency with 10,000 ledger events")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=10_000)
    parser.add_argument("--loads", type=int, default=20)
    args = parser.parse_args()
    processes: list[subprocess.Popen[bytes]] = []
    with tempfile.TemporaryDirectory(prefix="bench-console-") as tmp:
        mesh = start_mesh(Path(tmp), processes)
        try:
            started = time.perf_counter()
            acked = asyncio.run(ingest(load_endpoint(mesh.data_dir).billing, billing_token(mesh.data_dir),
                                       args.events))
            ingest_s = time.perf_counter() - started
            token = (mesh.data_dir / "router" / "admin_token").read_text().strip()
            timings = time_pages(mesh.openai_base_url.removesuffix("/v1"), mesh.ca_cert, token, args.loads)
        finally:
            stop_mesh(mesh)
    results = {path: {"median_ms": round(statistics.median(v), 1), "p95_ms": round(pct(v, 0.95), 1)}
               for path, v in timings.items()}
    slowest_median = max(r["median_ms"] for r in results.values())
    slowest_p95 = max(r["p95_ms"] for r in results.values())
    document = {
        "settings": {"events": args.events, "acked": acked, "ingest_s": round(ingest_s, 2), "loads": args.loads,
                     "load_average": os.getloadavg()[0], "cpus": os.cpu_count()},
        "results": results,
        "targets": [{"name": "slowest page, median load", "measured": slowest_median, "target": TARGET_MS,
                     "better": "lower", "anchor": None},
                    {"name": "slowest page, p95 load", "measured": slowest_p95, "target": TARGET_MS,
                     "better": "lower", "anchor": None}],
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "console.json").write_text(json.dumps(document, indent=2) + "\n")
    plot(results, RESULTS / "console.png")
    print(json.dumps(document, indent=2))


if __name__ == "__main__":
    main()
