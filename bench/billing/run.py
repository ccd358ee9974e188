"""Billing benchmark: StreamUsage events/s with durable commits, and Reserve/Settle/CheckBudget latency at
1, 50 and 200 concurrent callers — on SQLite (synchronous=FULL) and on a local PostgreSQL (fsync on).

The billing server runs in this process on 127.0.0.1 (real gRPC); callers are grpc.aio clients on one channel.
Writes bench/results/billing.json (every figure with units, targets with their anchor) and a PNG plot.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc

from autoglm.billing.v1 import billing_service_pb2 as pb2
from autoglm.billing.v1 import billing_service_pb2_grpc as pb2_grpc
from services.billing.config import BillingConfig
from services.billing.server import build_server
from services.common.config import ServerSettings
from services.common.logging import configure_logging
from tests.integration.billing.helpers import price_request, tenant_budget, usage

EVENTS = 20_000
CONCURRENCY = (1, 50, 200)
LAGO_EVENTS_PER_S = 15_000  # Lago's published ingestion claim (with a cluster)


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def stream_rate(stub: pb2_grpc.BillingServiceStub, tag: str) -> float:
    events = [pb2.StreamUsageRequest(event=usage(f"{tag}-{i}", prompt=100 + i % 50, completion=20, key=f"k{i % 20}"))
              for i in range(EVENTS)]
    start = time.perf_counter()
    acks = 0
    async for ack in stub.StreamUsage(iter(events)):
        assert not ack.error_code, ack.error_message
        acks += 1
    elapsed = time.perf_counter() - start
    assert acks == EVENTS
    return EVENTS / elapsed


async def latencies(stub: pb2_grpc.BillingServiceStub, callers: int, per_caller: int, tag: str) -> dict[str, Any]:
    samples: dict[str, list[float]] = {"Reserve": [], "Settle": [], "CheckBudget": []}

    async def caller(c: int) -> None:
        for n in range(per_caller):
            key = f"{tag}-{c}-{n}"
            t0 = time.perf_counter()
            hold = await stub.Reserve(pb2.ReserveRequest(tenant_id="bench", api_key_id=f"k{c}", model="smollm2",
                                                         max_prompt_tokens=200, max_completion_tokens=200,
                                                         request_id=key))
            t1 = time.perf_counter()
            await stub.Settle(pb2.SettleRequest(hold_id=hold.hold_id, event=usage(key, tenant="bench", prompt=150,
                                                                                   completion=40, key=f"k{c}")))
            t2 = time.perf_counter()
            await stub.CheckBudget(pb2.CheckBudgetRequest(tenant_id="bench", api_key_id=f"k{c}"))
            t3 = time.perf_counter()
            samples["Reserve"].append(t1 - t0)
            samples["Settle"].append(t2 - t1)
            samples["CheckBudget"].append(t3 - t2)

    start = time.perf_counter()
    await asyncio.gather(*(caller(c) for c in range(callers)))
    elapsed = time.perf_counter() - start
    out: dict[str, Any] = {"callers": callers, "reserve_per_s": round(len(samples["Reserve"]) / elapsed, 1)}
    for rpc, values in samples.items():
        out[f"{rpc}_p50_ms"] = round(statistics.median(values) * 1000, 3)
        out[f"{rpc}_p99_ms"] = round(pct(values, 0.99) * 1000, 3)
    return out


async def bench_database(name: str, dsn: str) -> dict[str, Any]:
    config = BillingConfig(server=ServerSettings(port=0), database=dsn)
    running = await build_server(config)
    try:
        async with grpc.aio.insecure_channel(running.address) as chan:
            stub = pb2_grpc.BillingServiceStub(chan)
            await stub.CreatePrice(price_request())
            await stub.CreateBudget(tenant_budget("bench", micros=10**15))
            await stream_rate(stub, f"{name}-warm")
            rate = await stream_rate(stub, f"{name}-run")
            table = [await latencies(stub, c, max(20, 600 // c) if c > 1 else 300, f"{name}-{c}") for c in CONCURRENCY]
    finally:
        await running.stop(grace=0)
    return {"database": name, "stream_events_per_s": round(rate, 1), "latency": table}


def plot(results: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    names = [r["database"] for r in results]
    left.bar(names, [r["stream_events_per_s"] for r in results], color=["#4c72b0", "#dd8452"][: len(results)])
    left.axhline(20_000, color="green", linestyle="--", label="target 20,000/s")
    left.axhline(LAGO_EVENTS_PER_S, color="grey", linestyle=":", label="Lago claim 15,000/s")
    left.set_title("StreamUsage, one stream, durable commits")
    left.set_ylabel("events / s")
    left.legend()
    for r in results:
        xs = [row["callers"] for row in r["latency"]]
        right.plot(xs, [row["Reserve_p99_ms"] for row in r["latency"]], marker="o", label=f"{r['database']} Reserve p99")
        right.plot(xs, [row["Reserve_p50_ms"] for row in r["latency"]], marker="x", linestyle="--",
                   label=f"{r['database']} Reserve p50")
    right.axhline(5, color="green", linestyle="--", label="target p99 5 ms")
    right.set_xscale("log")
    right.set_yscale("log")
    right.set_xlabel("concurrent callers")
    right.set_ylabel("ms")
    right.set_title("Reserve latency")
    right.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


async def main(out: Path, plot_path: Path) -> None:
    configure_logging("bench", "WARNING")
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-billing-") as tmp:
        results.append(await bench_database("sqlite", f"sqlite:///{Path(tmp) / 'billing.sqlite3'}"))
        try:
            from tests.integration.billing.conftest import postgres

            gen = postgres.__wrapped__()  # type: ignore[attr-defined]
            server = next(gen)
            try:
                results.append(await bench_database("postgres", server.create_database()))
            finally:
                next(gen, None)
        except Exception as exc:  # report what ran; say why PostgreSQL did not
            results.append({"database": "postgres", "skipped": str(exc)})
    measured = [r for r in results if "skipped" not in r]
    sqlite = results[0]
    reserve_200 = next(row for row in sqlite["latency"] if row["callers"] == 200)
    doc = {
        "benchmark": "billing",
        "machine": {"python": platform.python_version(), "cpu_count": __import__("os").cpu_count(),
                    "platform": platform.platform()},
        "method": "in-process server on 127.0.0.1, grpc.aio clients on one channel; SQLite WAL synchronous=FULL "
                  "with group commit; PostgreSQL 15 on a unix socket with fsync on; latency callers run "
                  "Reserve -> Settle -> CheckBudget in a closed loop",
        "results": {r["database"]: r for r in results},
        "units": {"stream_events_per_s": "events/s", "*_ms": "milliseconds", "reserve_per_s": "Reserve calls/s"},
        "targets": [
            {"name": "StreamUsage events/s, one stream, SQLite durable", "measured": sqlite["stream_events_per_s"],
             "target": 20_000, "better": "higher",
             "anchor": f"Lago claims {LAGO_EVENTS_PER_S} events/s with a cluster; ratio measured/Lago = "
                       f"{sqlite['stream_events_per_s'] / LAGO_EVENTS_PER_S:.2f}"},
            {"name": "Reserve p99 at 200 concurrent callers, SQLite (ms)", "measured": reserve_200["Reserve_p99_ms"],
             "target": 5, "better": "lower",
             "anchor": f"Reserve p99 at 1 caller in the same run: {sqlite['latency'][0]['Reserve_p99_ms']} ms"},
        ],
    }
    write_results(out, plot_path, doc, measured)


def write_results(out: Path, plot_path: Path, doc: dict[str, Any], measured: list[dict[str, Any]]) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2) + "\n")
    plot(measured, plot_path)
    print(json.dumps(doc["targets"], indent=2))


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=Path("bench/results/billing.json"))
    parser.add_argument("--plot", type=Path, default=Path("bench/results/billing.png"))
    args = parser.parse_args()
    asyncio.run(main(args.out, args.plot))
