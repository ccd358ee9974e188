"""`make bench-router` (second part): the router on its PostgreSQL store against its SQLite store, and
three routers against one.

Everything runs for real on 127.0.0.1, each service in its own process: billing (SQLite), one inference
replica with the bundled model, a throwaway PostgreSQL server and a throwaway Redis (unix sockets only).

1. Store on the request path: one router on the SQLite files, one on PostgreSQL (same billing, same
   replica). In interleaved rounds in rotating order the same request (cache bypassed, max_tokens=1) goes
   to the replica directly, through the SQLite router and through the PostgreSQL router; each router's
   added latency is its time minus the direct time of the same round. Target: PostgreSQL's added p50 at
   most 1.1 x SQLite's (keys, policies and the registry are served from memory; the store is written
   after the answer).
2. Scaling: three routers on the PostgreSQL store and Redis rate limits, every answer from the response
   cache (so the router, not the model, is the bottleneck). For `seconds` a fixed number of concurrent
   callers drive one router, then the same callers spread over all three; completions/s of each, with the
   CPU each process used (user + system seconds per wall second, from /proc), the client's included.

Writes bench/results/router-replicas.json and router-replicas.png. `--rounds` / `--seconds` shorten it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from autoglm.billing.v1 import billing_service_pb2 as billing_pb2
from autoglm.billing.v1 import billing_service_pb2_grpc as billing_grpc
from autoglm.common.v1 import generation_pb2, money_pb2
from autoglm.inference.v1 import inference_service_pb2 as inf_pb2
from autoglm.inference.v1 import inference_service_pb2_grpc as inf_grpc
from autoglm.router.v1 import admin_service_pb2 as admin_pb2
from autoglm.router.v1 import admin_service_pb2_grpc as admin_grpc
from autoglm.router.v1 import router_service_pb2 as pb2
from autoglm.router.v1 import router_service_pb2_grpc as router_grpc
from services.cli.endpoint import billing_token, operator_channel
from services.common.logging import configure_logging
from tests.integration.billing.conftest import PgServer, _pg_bin, throwaway_postgres
from tests.integration.router.conftest import ADMIN_TOKEN, MODEL
from tests.integration.router.service_process import drain, start_service, stop

OUT = Path(__file__).resolve().parents[1] / "results"
ADMIN = [("authorization", f"Bearer {ADMIN_TOKEN}")]
CALLERS = 48  # concurrent callers in the scaling part


@contextlib.contextmanager
def postgres(root: Path) -> Iterator[PgServer]:
    """A throwaway PostgreSQL cluster on a unix socket under `root` (the one tests/integration/billing runs)."""
    bindir = _pg_bin()
    if bindir is None:
        raise SystemExit("bench-router needs PostgreSQL's server binaries: make postgres-server")
    with throwaway_postgres(root, bindir) as server:
        yield server


@contextlib.contextmanager
def redis(root: Path) -> Iterator[str]:
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("bench-router needs redis-server: make redis-server")
    sock = root / "redis.sock"
    proc = subprocess.Popen([binary, "--port", "0", "--unixsocket", str(sock), "--save", "", "--appendonly", "no",
                             "--dir", str(root)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 10
        while not sock.exists():
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError("redis-server did not start")
            time.sleep(0.05)
        yield f"unix://{sock}"
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=10)


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start_router(tmp: Path, name: str, inference: str, billing: str, processes: list, **settings: str
                 ) -> tuple[subprocess.Popen[bytes], str]:
    config = tmp / f"{name}.yaml"
    config.write_text(json.dumps({"router": {"admin_token": ADMIN_TOKEN, "data_dir": str(tmp / name),
                                             "key_pepper_path": str(tmp / "key_pepper"), **settings}}))
    proc, address = start_service("router", ["--config", str(config), "--inference", inference, "--billing", billing],
                                  processes)
    drain(proc)
    return proc, address


async def store_latency(routers: dict[str, str], inference: str, rounds: int) -> dict[str, float]:
    """Added p50 of each router over the replica called directly, in interleaved rounds."""
    one = generation_pb2.SamplingParams(temperature=0.0, max_tokens=1)
    message = generation_pb2.ChatMessage(role=generation_pb2.CHAT_ROLE_USER, content="Hi")
    replica = inf_grpc.InferenceServiceStub(grpc.aio.insecure_channel(inference))
    stubs, auth = {}, {}
    for name, address in routers.items():
        channel = grpc.aio.insecure_channel(address)
        stubs[name] = router_grpc.RouterServiceStub(channel)
        key = await admin_grpc.AdminServiceStub(channel).CreateApiKey(
            admin_pb2.CreateApiKeyRequest(tenant_id=f"bench-{name}"), metadata=ADMIN, timeout=10)
        auth[name] = [("authorization", f"Bearer {key.secret}")]

    async def direct() -> float:
        start = time.perf_counter()
        async for _ in replica.Generate(inf_pb2.GenerateRequest(request_id="b", messages=[message], sampling=one)):
            pass
        return (time.perf_counter() - start) * 1000

    def routed(name: str):  # type: ignore[no-untyped-def]
        async def call() -> float:
            start = time.perf_counter()
            await stubs[name].Complete(pb2.CompleteRequest(model=MODEL, messages=[message], sampling=one,
                                                           cache_policy=pb2.CACHE_POLICY_BYPASS),
                                       metadata=auth[name], timeout=60)
            return (time.perf_counter() - start) * 1000
        return call

    calls = {"direct": direct, **{name: routed(name) for name in routers}}
    for _ in range(5):  # warm-up
        for call in calls.values():
            await call()
    timed: dict[str, list[float]] = {name: [] for name in calls}
    orders = list(itertools.permutations(calls))
    for i in range(rounds):
        for name in orders[i % len(orders)]:
            timed[name].append(await calls[name]())
    return {name: statistics.median([r - d for r, d in zip(timed[name], timed["direct"], strict=True)])
            for name in routers} | {"direct_p50_ms": statistics.median(timed["direct"])}


async def throughput(addresses: list[str], secret: str, seconds: float, pids: dict[str, int]
                     ) -> tuple[float, dict[str, float]]:
    """Completions/s answered from the routers' response caches by CALLERS callers spread over `addresses`,
    and each process's CPU (seconds per wall second) meanwhile."""
    channels = [grpc.aio.insecure_channel(a) for a in addresses]
    stubs = [router_grpc.RouterServiceStub(c) for c in channels]
    auth = [("authorization", f"Bearer {secret}")]
    request = pb2.CompleteRequest(model=MODEL, prompt="Name a colour.",
                                  sampling=generation_pb2.SamplingParams(temperature=0.0, max_tokens=4))
    for stub in stubs:  # fill each router's cache
        await stub.Complete(request, metadata=auth, timeout=120)
    done = 0
    stop_at = 0.0

    async def caller(i: int) -> None:
        nonlocal done
        stub = stubs[i % len(stubs)]
        while time.monotonic() < stop_at:
            await stub.Complete(request, metadata=auth, timeout=60)
            done += 1

    before = {name: cpu_seconds(pid) for name, pid in pids.items()}
    began = time.monotonic()
    stop_at = began + seconds
    await asyncio.gather(*(caller(i) for i in range(CALLERS)))
    wall = time.monotonic() - began
    cpu = {name: round((cpu_seconds(pid) - before[name]) / wall, 3) for name, pid in pids.items()}
    for channel in channels:
        await channel.close()
    return done / wall, cpu


async def main(rounds: int, seconds: float) -> None:
    configure_logging("bench", "WARNING")
    processes: list = []
    with tempfile.TemporaryDirectory(prefix="bench-replicas-") as name:
        tmp = Path(name)
        os.chmod(tmp, 0o755)  # PostgreSQL may run as another user
        with postgres(tmp) as pg, redis(tmp) as redis_url:
            try:
                billing_proc, billing = start_service("billing", ["--data-dir", str(tmp / "billing")], processes)
                inference_proc, inference = start_service(
                    "inference", ["--replica-id", "bench-1", "--threads", "1"], processes)
                drain(billing_proc)
                drain(inference_proc)
                async with operator_channel(billing, billing_token(tmp / "billing")) as operator:
                    await billing_grpc.BillingServiceStub(operator).CreatePrice(billing_pb2.CreatePriceRequest(
                        price=billing_pb2.Price(
                            model=MODEL, input_per_million=money_pb2.Money(currency_code="USD", micros=1_000_000),
                            output_per_million=money_pb2.Money(currency_code="USD", micros=2_000_000)),
                        actor="bench"), timeout=10)
                dsn = pg.create_database()
                shared = {"database": dsn, "rate_limit_redis_url": redis_url}
                _, sqlite_router = start_router(tmp, "sqlite", inference, billing, processes)
                pg_procs = [start_router(tmp, f"pg-{i}", inference, billing, processes, **shared) for i in range(3)]
                latency = await store_latency({"sqlite": sqlite_router, "postgresql": pg_procs[0][1]}, inference,
                                              rounds)
                key = await admin_grpc.AdminServiceStub(grpc.aio.insecure_channel(pg_procs[0][1])).CreateApiKey(
                    admin_pb2.CreateApiKeyRequest(tenant_id="bench-scaling"), metadata=ADMIN, timeout=10)
                pids = {f"router-{i}": proc.pid for i, (proc, _) in enumerate(pg_procs)} | {
                    "client": os.getpid(), "billing": billing_proc.pid, "inference": inference_proc.pid}
                one, cpu_one = await throughput([pg_procs[0][1]], key.secret, seconds, pids)
                three, cpu_three = await throughput([a for _, a in pg_procs], key.secret, seconds, pids)
            finally:
                stop(processes)
    ratio = latency["postgresql"] / latency["sqlite"] if latency["sqlite"] > 0 else float("inf")
    results = {
        "sqlite_added_p50_ms": round(latency["sqlite"], 3), "postgresql_added_p50_ms": round(latency["postgresql"], 3),
        "direct_p50_ms": round(latency["direct_p50_ms"], 3), "latency_rounds": rounds,
        "postgresql_over_sqlite_added_p50": round(ratio, 3),
        "one_router_completions_per_s": round(one, 1), "three_routers_completions_per_s": round(three, 1),
        "three_over_one": round(three / one, 3) if one else None,
        "cpu_one_router": cpu_one, "cpu_three_routers": cpu_three,
        "callers": CALLERS, "seconds_per_phase": seconds, "cores": os.cpu_count(),
        "load_average_at_end": os.getloadavg()[0],
    }
    targets = [
        {"name": "router added p50, PostgreSQL store over SQLite store", "measured": results[
            "postgresql_over_sqlite_added_p50"], "target": 1.1, "better": "lower",
         "anchor": "the same request (cache bypassed, max_tokens=1) to the replica directly and through each router, "
                   f"{rounds} interleaved rounds in rotating order, same run"},
        {"name": "completions/s from the response cache, 3 routers over 1", "measured": results["three_over_one"],
         "target": None, "better": "higher",
         "anchor": f"{CALLERS} concurrent callers in this process for {seconds:g} s per phase, same run; each "
                   f"process's CPU in cpu_one_router / cpu_three_routers (seconds per wall second)"},
    ]
    note = (f"{os.cpu_count()} cores shared by the client, billing, inference and the routers: three routers can "
            "only add throughput while a core has idle time; with every core busy (the client's CPU and the "
            "routers' sum near the core count) the ratio stays near 1, and a router per free core is what "
            "lets the aggregate grow, until the client or Redis/PostgreSQL is the bottleneck.")
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "router-replicas.json").write_text(json.dumps({"results": results, "targets": targets, "note": note},
                                                         indent=2) + "\n")
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    axes[0].bar(["SQLite", "PostgreSQL"], [latency["sqlite"], latency["postgresql"]])
    axes[0].set_ylabel("router added latency p50 (ms)")
    axes[0].set_title("Store on the request path")
    axes[1].bar(["1 router", "3 routers"], [one, three])
    axes[1].set_ylabel("completions/s (cache hits)")
    axes[1].set_title("Router replicas")
    fig.tight_layout()
    fig.savefig(OUT / "router-replicas.png", dpi=110)
    print(json.dumps({"results": results, "targets": targets}, indent=2))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=300, help="interleaved latency rounds")
    parser.add_argument("--seconds", type=float, default=30.0, help="seconds of load per scaling phase")
    options = parser.parse_args()
    asyncio.run(main(options.rounds, options.seconds))
    sys.exit(0)
