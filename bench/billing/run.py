"""Billing benchmark: StreamUsage events/s with durable commits, and Reserve/Settle/CheckBudget latency at
1, 50 and 200 concurrent callers — on SQLite (synchronous=FULL) and on a local PostgreSQL (fsync on).

Billing runs as its own process (`python -m services.billing`) on 127.0.0.1; callers are grpc.aio clients on
one channel in this process. The anchor is a BillingService that does nothing (`bench.billing.noop_server`)
served exactly as billing is: its own process started the same way, the same grpc I/O path and event loop,
the same server factory (`services/common/grpc_server.py`). Both run side by side and are measured in turn,
interleaved (each measurement alternates which of the two goes first), so each figure is also given as a
ratio to what billing's gRPC path alone costs here, under the same conditions.
Writes bench/results/billing.json (every figure with units, targets with their anchor) and a PNG plot.

    python -m bench.billing.run [--events 20000] [--calls 600] [--runs 3] [--no-postgres]
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from autoglm.billing.v1 import billing_service_pb2 as pb2
from autoglm.billing.v1 import billing_service_pb2_grpc as pb2_grpc
from services.common.logging import configure_logging
from tests.integration.billing.helpers import operator, price_request, tenant_budget, usage
from tests.integration.billing.procs import operator_token, start_billing, wait_port

ROOT = Path(__file__).resolve().parents[2]

EVENTS = 20_000  # per StreamUsage run (--events)
CALLS = 600  # per concurrency level and server (--calls), split across the callers
BATCH = 250  # events per message in the client-batched stream
CONCURRENCY = (1, 50, 200)
LAGO_EVENTS_PER_S = 15_000  # Lago's published ingestion claim (with a cluster)


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


@dataclass(frozen=True)
class Scale:
    events: int = EVENTS
    calls: int = CALLS
    runs: int = 3


def stream_requests(tag: str, batch: int, events: int) -> list[pb2.StreamUsageRequest]:
    made = [usage(f"{tag}-{i}", prompt=100 + i % 50, completion=20, key=f"k{i % 20}") for i in range(events)]
    if batch == 1:
        return [pb2.StreamUsageRequest(event=e) for e in made]
    return [pb2.StreamUsageRequest(events=made[i:i + batch]) for i in range(0, events, batch)]


async def stream_once(stub: pb2_grpc.BillingServiceStub, tag: str, batch: int, events: int) -> float:
    """Events/s over one StreamUsage, from the first send to the last ack (each ack follows its commit)."""
    requests = stream_requests(tag, batch, events)
    start = time.perf_counter()
    acks = 0
    async for reply in stub.StreamUsage(iter(requests)):
        for ack in reply.acks or [reply]:
            assert not ack.error_code, ack.error_message
            acks += 1
    elapsed = time.perf_counter() - start
    assert acks == events
    return events / elapsed


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process has used so far (all its threads), from /proc/<pid>/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def on_cpu(pid: int, spent: list[float], work: Awaitable[float]) -> float:
    """`work`'s result, adding the CPU seconds process `pid` used meanwhile to `spent`."""
    before = cpu_seconds(pid)
    result = await work
    spent.append(cpu_seconds(pid) - before)
    return result


def summary(values: list[float]) -> tuple[float, float]:
    return round(statistics.median(values) * 1000, 3), round(pct(values, 0.99) * 1000, 3)


def per_caller(callers: int, calls: int) -> int:
    """Steps per caller at a concurrency level: a single caller makes half the calls (they are serial)."""
    return calls // 2 if callers == 1 else max(2, calls // callers)


async def closed_loop(callers: int, count: int, step: Callable[[int, int], Awaitable[None]]) -> float:
    start = time.perf_counter()
    await asyncio.gather(*(_caller(c, count, step) for c in range(callers)))
    return time.perf_counter() - start


async def _caller(c: int, count: int, step: Callable[[int, int], Awaitable[None]]) -> None:
    for n in range(count):
        await step(c, n)


async def billing_round(stub: pb2_grpc.BillingServiceStub, callers: int, count: int, tag: str,
                        samples: dict[str, list[float]]) -> float:
    """One closed-loop round of Reserve -> Settle -> CheckBudget per step; returns its wall time."""

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

    return await closed_loop(callers, count, step)


async def noop_round(stub: pb2_grpc.BillingServiceStub, callers: int, count: int, tag: str,
                     values: list[float]) -> float:
    """The anchor's round: one no-op unary call per step, in the same closed loop."""

    async def step(c: int, n: int) -> None:
        t0 = time.perf_counter()
        await stub.Reserve(pb2.ReserveRequest(tenant_id="bench", model="smollm2", request_id=f"{tag}-{c}-{n}"))
        values.append(time.perf_counter() - t0)

    return await closed_loop(callers, count, step)


async def alternate(runs: int, first: Callable[[int], Awaitable[Any]], second: Callable[[int], Awaitable[Any]]
                    ) -> tuple[list[Any], list[Any]]:
    """`runs` interleaved measurements of both: ABBA order, so neither always runs on a warmer machine."""
    a: list[Any] = []
    b: list[Any] = []
    for run in range(runs):
        if run % 2 == 0:
            a.append(await first(run))
            b.append(await second(run))
        else:
            b.append(await second(run))
            a.append(await first(run))
    return a, b


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


def start_noop(workdir: Path, name: str) -> Process:
    """The anchor, started the way `tests.integration.billing.procs.start_billing` starts billing."""
    port_file = workdir / f"{name}.port"
    port_file.unlink(missing_ok=True)
    log = (workdir / f"{name}.log").open("ab")
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.billing.noop_server", "--port", "0", "--port-file", str(port_file),
         "--log-level", "WARNING"],
        cwd=ROOT, stdout=log, stderr=log, start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    return Process(proc, wait_port(proc, port_file))


async def bench_database(name: str, dsn: str, workdir: Path, scale: Scale) -> tuple[dict[str, Any], dict[str, Any]]:
    """Billing on `dsn` and the no-op anchor, measured in turn: (billing's figures, the anchor's)."""
    proc, port_file = start_billing(dsn, workdir, f"billing-{name}")
    servers = [Process(proc, wait_port(proc, port_file)), start_noop(workdir, f"noop-{name}")]
    try:
        async with operator(servers[0].address, operator_token(workdir)) as admin:
            await pb2_grpc.BillingServiceStub(admin).CreatePrice(price_request())
            await pb2_grpc.BillingServiceStub(admin).CreateBudget(tenant_budget("bench", micros=10**15))
        async with grpc.aio.insecure_channel(servers[0].address) as chan, \
                grpc.aio.insecure_channel(servers[1].address) as noop_chan:
            stub, noop = pb2_grpc.BillingServiceStub(chan), pb2_grpc.BillingServiceStub(noop_chan)
            await stream_once(stub, f"{name}-warm", BATCH, scale.events)
            await stream_once(noop, f"{name}-warm", BATCH, scale.events)
            streams: dict[str, tuple[float, float]] = {}
            for key, batch in (("stream_events_per_s", 1), ("stream_batched_events_per_s", BATCH)):
                def billing_stream(run: int, key: str = key, batch: int = batch) -> Awaitable[float]:
                    return stream_once(stub, f"{name}-{key}-{run}", batch, scale.events)

                def noop_stream(run: int, key: str = key, batch: int = batch) -> Awaitable[float]:
                    return stream_once(noop, f"{name}-{key}-{run}", batch, scale.events)

                real, bare = await alternate(scale.runs, billing_stream, noop_stream)
                streams[key] = (round(statistics.median(real), 1), round(statistics.median(bare), 1))
            table, noop_table = [], []
            for callers in CONCURRENCY:
                count = max(1, per_caller(callers, scale.calls) // 2)  # per round; two rounds each
                samples: dict[str, list[float]] = {"Reserve": [], "Settle": [], "CheckBudget": []}
                values: list[float] = []
                billing_cpu: list[float] = []
                noop_cpu: list[float] = []

                def billing_calls(run: int, callers: int = callers, count: int = count,
                                  samples: dict[str, list[float]] = samples,
                                  spent: list[float] = billing_cpu) -> Awaitable[float]:
                    return on_cpu(servers[0].proc.pid, spent,
                                  billing_round(stub, callers, count, f"{name}-{callers}-{run}", samples))

                def noop_calls(run: int, callers: int = callers, count: int = count,
                               values: list[float] = values, spent: list[float] = noop_cpu) -> Awaitable[float]:
                    return on_cpu(servers[1].proc.pid, spent,
                                  noop_round(noop, callers, count, f"{name}-{callers}-{run}", values))

                real_s, noop_s = await alternate(2, billing_calls, noop_calls)
                row: dict[str, Any] = {"callers": callers,
                                       "reserve_per_s": round(len(samples["Reserve"]) / sum(real_s), 1),
                                       # Reserve + Settle + CheckBudget: the server's CPU for one step
                                       "server_cpu_ms_per_step": round(sum(billing_cpu) * 1000
                                                                       / len(samples["Reserve"]), 3)}
                for rpc, measured in samples.items():
                    row[f"{rpc}_p50_ms"], row[f"{rpc}_p99_ms"] = summary(measured)
                table.append(row)
                p50, p99 = summary(values)
                noop_table.append({"callers": callers, "calls_per_s": round(len(values) / sum(noop_s), 1),
                                   "noop_p50_ms": p50, "noop_p99_ms": p99,
                                   "server_cpu_ms_per_call": round(sum(noop_cpu) * 1000 / len(values), 3)})
    finally:
        for server in servers:
            server.stop()
    result = {"database": name, "latency": table, **{k: v[0] for k, v in streams.items()}}
    anchor = {"paired_with": name, "latency": noop_table, **{k: v[1] for k, v in streams.items()}}
    return result, anchor


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
        per_rpc = by_callers[callers]["server_cpu_ms_per_step"] / 3
        rows.append({"name": f"Billing server CPU per RPC (a Reserve -> Settle -> CheckBudget step / 3) / no-op "
                             f"server CPU per call at {callers} concurrent callers, SQLite",
                     "measured": round(per_rpc / max(noop[callers]["server_cpu_ms_per_call"], 1e-9), 2),
                     "target": 1.5, "better": "lower",
                     "anchor": f"no-op {noop[callers]['server_cpu_ms_per_call']} ms CPU per call, billing "
                               f"{per_rpc:.3f} ms CPU per RPC, same run (at saturation it predicts the latency ratio)"})
        for q in ("p50", "p99"):
            ratio = by_callers[callers][f"Reserve_{q}_ms"] / max(noop[callers][f"noop_{q}_ms"], 1e-9)
            rows.append({"name": f"Reserve {q} / no-op gRPC call {q} at {callers} concurrent callers, SQLite",
                         # the per-request path behind budget leases: p99 at 200 callers <= 1.5, else <= 2.0
                         "measured": round(ratio, 2), "target": 1.5 if (q, callers) == ("p99", 200) else 2.0,
                         "better": "lower",
                         "anchor": f"no-op {q} {noop[callers][f'noop_{q}_ms']} ms, Reserve {q} "
                                   f"{by_callers[callers][f'Reserve_{q}_ms']} ms, same run"})
    return rows


async def main(out: Path, plot_path: Path, scale: Scale, with_postgres: bool) -> None:
    configure_logging("bench", "WARNING")
    results: list[dict[str, Any]] = []
    anchors: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-billing-") as tmp:
        workdir = Path(tmp)
        result, anchors["sqlite"] = await bench_database("sqlite", f"sqlite:///{workdir / 'billing.sqlite3'}",
                                                         workdir, scale)
        results.append(result)
        try:
            if not with_postgres:
                raise RuntimeError("--no-postgres")
            from tests.integration.billing.conftest import postgres

            gen = postgres.__wrapped__()  # type: ignore[attr-defined]
            server = next(gen)
            try:
                result, anchors["postgres"] = await bench_database("postgres", server.create_database(), workdir,
                                                                   scale)
                results.append(result)
            finally:
                next(gen, None)
        except (Exception, pytest.skip.Exception, pytest.fail.Exception) as exc:  # report what ran; say why not
            results.append({"database": "postgres", "skipped": str(exc)})
    measured = [r for r in results if "skipped" not in r]
    anchor = anchors["sqlite"]
    doc = {
        "benchmark": "billing",
        "machine": {"python": platform.python_version(), "cpu_count": os.cpu_count(),
                    "platform": platform.platform(), "load_average_at_end": list(os.getloadavg())},
        "method": f"stream rates are the median of {scale.runs} runs of {scale.events} events; billing in its own "
                  "process (python -m services.billing) on 127.0.0.1; grpc.aio clients on one channel per server in "
                  "the bench process; SQLite WAL synchronous=FULL with group commit; PostgreSQL on a unix socket "
                  "with fsync on; latency callers run Reserve -> Settle -> CheckBudget in a closed loop. Anchor: a "
                  "BillingService doing nothing (bench.billing.noop_server), its own process started like billing, "
                  "on the same event loop (uvloop via run_service), grpc I/O path (services.common.grpc_engine) and "
                  "server factory (services.common.grpc_server.start_server); it runs beside billing and every "
                  "measurement alternates between the two (ABBA order), same client, same run",
        "anchor_noop_grpc": anchor,
        "anchors_by_database": anchors,
        "results": {r["database"]: r for r in results},
        "units": {"*_events_per_s": "events/s", "*_ms": "milliseconds", "reserve_per_s": "Reserve calls/s",
                  "server_cpu_ms_per_step": "CPU milliseconds (user + system, every thread) the billing process "
                                            "spent per Reserve -> Settle -> CheckBudget step",
                  "server_cpu_ms_per_call": "CPU milliseconds the no-op anchor's process spent per call",
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
    parser.add_argument("--events", type=int, default=EVENTS, help="events per StreamUsage run")
    parser.add_argument("--calls", type=int, default=CALLS, help="calls per concurrency level and server")
    parser.add_argument("--runs", type=int, default=3, help="interleaved StreamUsage runs per server")
    parser.add_argument("--no-postgres", action="store_true", help="measure SQLite only")
    args = parser.parse_args()
    asyncio.run(main(args.out, args.plot, Scale(args.events, args.calls, args.runs), not args.no_postgres))
