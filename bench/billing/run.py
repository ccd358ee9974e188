"""Billing benchmark: StreamUsage events/s with durable commits, and Reserve/Settle/CheckBudget latency at
1, 50 and 200 concurrent callers — on SQLite (synchronous=FULL) and on a local PostgreSQL (fsync on).

Billing runs as its own process (`python -m services.billing`) on 127.0.0.1; callers are grpc.aio clients on
one channel in this process. Anchors measured in the same run: a bare grpc.aio server of the same messages
that does nothing (`bench.billing.noop_server`) — its StreamUsage echo rate and its unary call latency at the
same concurrency — so each figure is also given as a ratio to what Python gRPC alone costs here.
Writes bench/results/billing.json (every figure with units, targets with their anchor) and a PNG plot.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc

from autoglm.billing.v1 import billing_service_pb2 as pb2
from autoglm.billing.v1 import billing_service_pb2_grpc as pb2_grpc
from services.common.logging import configure_logging
from tests.integration.billing.helpers import operator, price_request, tenant_budget, usage
from tests.integration.billing.procs import operator_token, start_billing, wait_port

EVENTS = 20_000
BATCH = 250  # events per message in the client-batched stream
CONCURRENCY = (1, 50, 200)
LAGO_EVENTS_PER_S = 15_000  # Lago's published ingestion claim (with a cluster)


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def stream_requests(tag: str, batch: int) -> list[pb2.StreamUsageRequest]:
    events = [usage(f"{tag}-{i}", prompt=100 + i % 50, completion=20, key=f"k{i % 20}") for i in range(EVENTS)]
    if batch == 1:
        return [pb2.StreamUsageRequest(event=e) for e in events]
    return [pb2.StreamUsageRequest(events=events[i:i + batch]) for i in range(0, EVENTS, batch)]


async def stream_rate(stub: pb2_grpc.BillingServiceStub, tag: str, batch: int = 1, runs: int = 3) -> float:
    """Median over `runs` of events/s over one StreamUsage, each from the first send to the last ack (each ack
    follows its commit); every run sends new event ids."""
    return statistics.median([await _stream_once(stub, f"{tag}-{run}", batch) for run in range(runs)])


async def _stream_once(stub: pb2_grpc.BillingServiceStub, tag: str, batch: int) -> float:
    requests = stream_requests(tag, batch)
    start = time.perf_counter()
    acks = 0
    async for reply in stub.StreamUsage(iter(requests)):
        for ack in reply.acks or [reply]:
            assert not ack.error_code, ack.error_message
            acks += 1
    elapsed = time.perf_counter() - start
    assert acks == EVENTS
    return EVENTS / elapsed


def summary(values: list[float]) -> tuple[float, float]:
    return round(statistics.median(values) * 1000, 3), round(pct(values, 0.99) * 1000, 3)


def per_caller(callers: int) -> int:
    return 300 if callers == 1 else max(20, 600 // callers)


async def closed_loop(callers: int, step: Callable[[int, int], Awaitable[None]]) -> float:
    start = time.perf_counter()
    await asyncio.gather(*(_caller(c, per_caller(callers), step) for c in range(callers)))
    return time.perf_counter() - start


async def _caller(c: int, count: int, step: Callable[[int, int], Awaitable[None]]) -> None:
    for n in range(count):
        await step(c, n)


async def latencies(stub: pb2_grpc.BillingServiceStub, callers: int, tag: str) -> dict[str, Any]:
    samples: dict[str, list[float]] = {"Reserve": [], "Settle": [], "CheckBudget": []}

    async def step(c: int, n: int) -> None:
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

    elapsed = await closed_loop(callers, step)
    out: dict[str, Any] = {"callers": callers, "reserve_per_s": round(len(samples["Reserve"]) / elapsed, 1)}
    for rpc, values in samples.items():
        out[f"{rpc}_p50_ms"], out[f"{rpc}_p99_ms"] = summary(values)
    return out


async def noop_latency(stub: pb2_grpc.BillingServiceStub, callers: int) -> dict[str, Any]:
    """The anchor: a no-op unary call (bare grpc.aio server) in the same closed loop, one call per step."""
    values: list[float] = []

    async def step(c: int, n: int) -> None:
        t0 = time.perf_counter()
        await stub.Reserve(pb2.ReserveRequest(tenant_id="bench", model="smollm2", request_id=f"{c}-{n}"))
        values.append(time.perf_counter() - t0)

    elapsed = await closed_loop(callers, step)
    p50, p99 = summary(values)
    return {"callers": callers, "calls_per_s": round(len(values) / elapsed, 1), "noop_p50_ms": p50, "noop_p99_ms": p99}


class Process:
    """A server process of this benchmark, stopped by its PID."""

    def __init__(self, proc: subprocess.Popen[bytes], address: str) -> None:
        self.proc, self.address = proc, address

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def start_noop(workdir: Path) -> Process:
    port_file = workdir / "noop.port"
    proc = subprocess.Popen([sys.executable, "-m", "bench.billing.noop_server", "--port-file", str(port_file)],
                            start_new_session=True)
    return Process(proc, wait_port(proc, port_file))


async def bench_anchor(workdir: Path) -> dict[str, Any]:
    server = start_noop(workdir)
    try:
        async with grpc.aio.insecure_channel(server.address) as chan:
            stub = pb2_grpc.BillingServiceStub(chan)
            await stream_rate(stub, "warm", runs=1)
            single = await stream_rate(stub, "single")
            batched = await stream_rate(stub, "batched", BATCH)
            table = [await noop_latency(stub, c) for c in CONCURRENCY]
    finally:
        server.stop()
    return {"stream_events_per_s": round(single, 1), "stream_batched_events_per_s": round(batched, 1),
            "latency": table}


async def bench_database(name: str, dsn: str, workdir: Path) -> dict[str, Any]:
    proc, port_file = start_billing(dsn, workdir, f"billing-{name}")
    server = Process(proc, wait_port(proc, port_file))
    try:
        async with operator(server.address, operator_token(workdir)) as admin:
            await pb2_grpc.BillingServiceStub(admin).CreatePrice(price_request())
            await pb2_grpc.BillingServiceStub(admin).CreateBudget(tenant_budget("bench", micros=10**15))
        async with grpc.aio.insecure_channel(server.address) as chan:
            stub = pb2_grpc.BillingServiceStub(chan)
            await stream_rate(stub, f"{name}-warm", BATCH, runs=1)
            single = await stream_rate(stub, f"{name}-single")
            batched = await stream_rate(stub, f"{name}-batched", BATCH)
            table = [await latencies(stub, c, f"{name}-{c}") for c in CONCURRENCY]
    finally:
        server.stop()
    return {"database": name, "stream_events_per_s": round(single, 1),
            "stream_batched_events_per_s": round(batched, 1), "latency": table}


def plot(results: list[dict[str, Any]], anchor: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    names, single, batched = ["no-op gRPC"], [anchor["stream_events_per_s"]], [anchor["stream_batched_events_per_s"]]
    for r in results:
        names.append(r["database"])
        single.append(r["stream_events_per_s"])
        batched.append(r["stream_batched_events_per_s"])
    xs = range(len(names))
    left.bar([x - 0.2 for x in xs], single, width=0.4, label="1 event / message", color="#4c72b0")
    left.bar([x + 0.2 for x in xs], batched, width=0.4, label=f"{BATCH} events / message", color="#dd8452")
    left.set_xticks(list(xs), names)
    left.axhline(20_000, color="green", linestyle="--", label="target 20,000/s")
    left.axhline(LAGO_EVENTS_PER_S, color="grey", linestyle=":", label="Lago claim 15,000/s")
    left.set_title("StreamUsage, one stream, durable commits")
    left.set_ylabel("events / s (log)")
    left.set_yscale("log")
    left.legend(fontsize=7)
    for r in results:
        xs2 = [row["callers"] for row in r["latency"]]
        right.plot(xs2, [row["Reserve_p99_ms"] for row in r["latency"]], marker="o", label=f"{r['database']} Reserve p99")
        right.plot(xs2, [row["Reserve_p50_ms"] for row in r["latency"]], marker="x", linestyle="--",
                   label=f"{r['database']} Reserve p50")
    right.plot([row["callers"] for row in anchor["latency"]], [row["noop_p99_ms"] for row in anchor["latency"]],
               marker="s", color="black", label="no-op gRPC call p99 (anchor)")
    right.axhline(5, color="green", linestyle="--", label="target p99 5 ms")
    right.set_xscale("log")
    right.set_yscale("log")
    right.set_xlabel("concurrent callers")
    right.set_ylabel("ms")
    right.set_title("Reserve latency vs a no-op gRPC call")
    right.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def targets(sqlite: dict[str, Any], anchor: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for key, how in (("stream_events_per_s", "1 event per message"),
                     ("stream_batched_events_per_s", f"client-batched, {BATCH} events per message")):
        rows.append({"name": f"StreamUsage events/s, one stream, SQLite durable ({how})", "measured": sqlite[key],
                     "target": 20_000, "better": "higher",
                     "anchor": f"Lago claims {LAGO_EVENTS_PER_S} events/s with a cluster (measured/Lago = "
                               f"{sqlite[key] / LAGO_EVENTS_PER_S:.2f}); a no-op gRPC echo of the same stream "
                               f"did {anchor[key]} events/s in this run (measured/no-op = {sqlite[key] / anchor[key]:.2f})"})
    by_callers = {row["callers"]: row for row in sqlite["latency"]}
    noop = {row["callers"]: row for row in anchor["latency"]}
    rows.append({"name": "Reserve p99 at 200 concurrent callers, SQLite (ms)", "measured": by_callers[200]["Reserve_p99_ms"],
                 "target": 5, "better": "lower",
                 "anchor": f"a no-op gRPC unary call at 200 concurrent callers in this run: p99 "
                           f"{noop[200]['noop_p99_ms']} ms"})
    for callers in CONCURRENCY:
        for q in ("p50", "p99"):
            ratio = by_callers[callers][f"Reserve_{q}_ms"] / max(noop[callers][f"noop_{q}_ms"], 1e-9)
            rows.append({"name": f"Reserve {q} / no-op gRPC call {q} at {callers} concurrent callers, SQLite",
                         "measured": round(ratio, 2), "target": 2.0, "better": "lower",
                         "anchor": f"no-op {q} {noop[callers][f'noop_{q}_ms']} ms, Reserve {q} "
                                   f"{by_callers[callers][f'Reserve_{q}_ms']} ms, same run"})
    return rows


async def main(out: Path, plot_path: Path) -> None:
    configure_logging("bench", "WARNING")
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench-billing-") as tmp:
        workdir = Path(tmp)
        anchor = await bench_anchor(workdir)
        results.append(await bench_database("sqlite", f"sqlite:///{workdir / 'billing.sqlite3'}", workdir))
        try:
            from tests.integration.billing.conftest import postgres

            gen = postgres.__wrapped__()  # type: ignore[attr-defined]
            server = next(gen)
            try:
                results.append(await bench_database("postgres", server.create_database(), workdir))
            finally:
                next(gen, None)
        except Exception as exc:  # report what ran; say why PostgreSQL did not
            results.append({"database": "postgres", "skipped": str(exc)})
    measured = [r for r in results if "skipped" not in r]
    doc = {
        "benchmark": "billing",
        "machine": {"python": platform.python_version(), "cpu_count": os.cpu_count(),
                    "platform": platform.platform(), "load_average_at_end": list(os.getloadavg())},
        "method": "stream rates are the median of 3 runs of 20,000 events; billing in its own process (python -m services.billing) on 127.0.0.1; grpc.aio clients on one "
                  "channel in the bench process; SQLite WAL synchronous=FULL with group commit; PostgreSQL 15 on a "
                  "unix socket with fsync on; latency callers run Reserve -> Settle -> CheckBudget in a closed "
                  "loop; anchor: a bare grpc.aio server of the same messages doing nothing, same client, same run",
        "anchor_noop_grpc": anchor,
        "results": {r["database"]: r for r in results},
        "units": {"*_events_per_s": "events/s", "*_ms": "milliseconds", "reserve_per_s": "Reserve calls/s",
                  "calls_per_s": "calls/s", "targets[].measured": "as named (ms, events/s, or a ratio)"},
        "targets": targets(results[0], anchor),
    }
    write_results(out, plot_path, doc, measured, anchor)


def write_results(out: Path, plot_path: Path, doc: dict[str, Any], measured: list[dict[str, Any]],
                  anchor: dict[str, Any]) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2) + "\n")
    plot(measured, anchor, plot_path)
    print(json.dumps(doc["targets"], indent=2))


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=Path("bench/results/billing.json"))
    parser.add_argument("--plot", type=Path, default=Path("bench/results/billing.png"))
    args = parser.parse_args()
    asyncio.run(main(args.out, args.plot))
