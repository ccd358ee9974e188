"""`make bench-router-leases`: what billing leases save, against the per-request Reserve/Settle path.

Real processes on 127.0.0.1: billing (SQLite, its metrics endpoint scraped for the RPCs it started), one
inference replica with the bundled model, two routers on them (one with `billing_leases` off: Reserve and
Settle per request; one with it on: in-process admission against leases, usage batched over one
StreamUsage stream) and the bare grpc.aio relay of bench/router/floor_relay.py. Measured in one run:

- billing RPCs per 1,000 requests through each router, by method (every BillingService RPC billing started
  while the requests ran and settled, the router's background lease refreshes and price reloads included;
  the other router is frozen meanwhile, so its background calls are not counted);
- each router's added p50 over the bare relay, in interleaved rounds of the same call (max_tokens 1);
- the issue's probe through the leasing router: 1,000 concurrent requests ("Say hi.", max_tokens 8) from one
  key against a hard budget worth 100 of their worst cases: overshoot and the share of the budget spent.

Writes bench/results/router-leases.json (results and targets, the per-request path's figures beside the
leased ones). `--rounds` and `--requests` shorten a run.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import signal
import statistics
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from autoglm.billing.v1 import billing_service_pb2 as billing_pb2
from autoglm.billing.v1 import billing_service_pb2_grpc as billing_grpc
from autoglm.common.v1 import generation_pb2, money_pb2
from autoglm.router.v1 import admin_service_pb2 as admin_pb2
from autoglm.router.v1 import admin_service_pb2_grpc as admin_grpc
from autoglm.router.v1 import router_service_pb2 as pb2
from autoglm.router.v1 import router_service_pb2_grpc as router_grpc
from bench.router.bench_router import start_floor
from services.cli.endpoint import billing_token, operator_channel
from services.common.logging import configure_logging
from services.common.ports import free_port
from tests.integration.router.conftest import ADMIN_TOKEN, MODEL
from tests.integration.router.service_process import drain, start_service, stop
from tests.settlement import router_backlog

OUT = Path(__file__).resolve().parents[1] / "results"
ADMIN = [("authorization", f"Bearer {ADMIN_TOKEN}")]
BILLING_METHODS = ("Reserve", "Settle", "Release", "RecordUsage", "StreamUsage", "AcquireLeases", "ReturnLease",
                   "WatchLeases", "AckLeaseChange",
                   "CheckBudget", "ListPrices")
PRICE_IN, PRICE_OUT = 1_000_000, 2_000_000  # micro-units per million tokens: 1 and 2 micro-units per token


def billing_rpcs(metrics_url: str) -> dict[str, int]:
    """RPCs billing started so far, by method."""
    text = urllib.request.urlopen(metrics_url, timeout=10).read().decode()
    counts: dict[str, int] = {}
    for line in text.splitlines():
        if not line.startswith("autoglm_rpc_started_total{") or "BillingService" not in line:
            continue
        for m in BILLING_METHODS:
            if f'/{m}"' in line:
                counts[m] = counts.get(m, 0) + int(float(line.rsplit(" ", 1)[1]))
    return counts


class Router:
    def __init__(self, name: str, address: str, data_dir: Path, proc: subprocess.Popen[bytes]) -> None:
        self.name, self.data_dir, self.proc = name, data_dir, proc
        self.channel = grpc.aio.insecure_channel(address)
        self.stub = router_grpc.RouterServiceStub(self.channel)
        self.admin = admin_grpc.AdminServiceStub(self.channel)

    async def key(self, tenant: str) -> list[tuple[str, str]]:
        key = await self.admin.CreateApiKey(admin_pb2.CreateApiKeyRequest(tenant_id=tenant), metadata=ADMIN,
                                            timeout=10)
        return [("authorization", f"Bearer {key.secret}")]


async def settled(routers: list[Router], timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while any(router_backlog(r.data_dir) for r in routers):
        if time.monotonic() > deadline:
            raise RuntimeError("the routers' usage did not settle")
        await asyncio.sleep(0.2)


def complete(prompt: str, max_tokens: int) -> pb2.CompleteRequest:
    return pb2.CompleteRequest(
        model=MODEL, messages=[generation_pb2.ChatMessage(role=generation_pb2.CHAT_ROLE_USER, content=prompt)],
        cache_policy=pb2.CACHE_POLICY_BYPASS, sampling=generation_pb2.SamplingParams(temperature=0.0,
                                                                                      max_tokens=max_tokens))


async def rpcs_per_1000(router: Router, idle: Router, metrics_url: str, requests: int,
                        concurrency: int = 16) -> dict[str, object]:
    """Billing RPCs while `router` serves `requests` (the other router frozen meanwhile: its background
    calls are not counted)."""
    auth = await router.key("bench")
    await router.stub.Complete(complete("Hi", 1), metadata=auth, timeout=60)  # the caller's leases are fetched
    await settled([router])
    os.kill(idle.proc.pid, signal.SIGSTOP)
    try:
        return await _count(router, auth, metrics_url, requests, concurrency)
    finally:
        os.kill(idle.proc.pid, signal.SIGCONT)


async def _count(router: Router, auth: list[tuple[str, str]], metrics_url: str, requests: int,
                 concurrency: int) -> dict[str, object]:
    before = billing_rpcs(metrics_url)
    queue = list(range(requests))

    async def worker() -> None:
        while queue:
            queue.pop()
            await router.stub.Complete(complete("Hi", 1), metadata=auth, timeout=120)

    started = time.monotonic()
    await asyncio.gather(*[worker() for _ in range(concurrency)])
    await settled([router])
    elapsed = time.monotonic() - started
    after = billing_rpcs(metrics_url)
    by_method = {m: after.get(m, 0) - before.get(m, 0) for m in BILLING_METHODS if after.get(m, 0) > before.get(m, 0)}
    rpcs = sum(by_method.values())
    return {"billing_rpcs": rpcs, "by_method": by_method, "requests": requests,
            "per_1000": round(rpcs * 1000 / requests, 1), "seconds": round(elapsed, 1),
            "requests_per_s": round(requests / elapsed, 1)}


async def added_p50(routers: list[Router], floor: router_grpc.RouterServiceStub, rounds: int) -> dict[str, float]:
    auths = {r.name: await r.key("bench") for r in routers}
    request = complete("Hi", 1)

    async def timed(call) -> float:  # type: ignore[no-untyped-def]
        start = time.perf_counter()
        await call
        return (time.perf_counter() - start) * 1000

    def through(router: Router):  # type: ignore[no-untyped-def]
        return lambda: router.stub.Complete(request, metadata=auths[router.name], timeout=60)

    calls = {"floor": lambda: floor.Complete(request, timeout=60)}
    for r in routers:
        calls[r.name] = through(r)
    for _ in range(10):
        for call in calls.values():
            await call()
    times: dict[str, list[float]] = {name: [] for name in calls}
    orders = list(itertools.permutations(calls))
    for i in range(rounds):
        for name in orders[i % len(orders)]:
            times[name].append(await timed(calls[name]()))
    out: dict[str, float] = {"rounds": rounds, "floor_p50_ms": round(statistics.median(times["floor"]), 3)}
    for r in routers:
        out[f"{r.name}_p50_ms"] = round(statistics.median(times[r.name]), 3)
        out[f"{r.name}_added_over_floor_p50_ms"] = round(statistics.median(
            [a - f for a, f in zip(times[r.name], times["floor"], strict=True)]), 3)
    return out


async def probe(router: Router, operator: billing_grpc.BillingServiceStub, requests: int) -> dict[str, float]:
    """The issue's probe: `requests` concurrent requests against a hard budget worth 100 worst cases."""
    sizing = await router.stub.Complete(complete("Say hi.", 8), metadata=await router.key("sizing"), timeout=60)
    worst = sizing.usage.prompt_tokens * PRICE_IN // 1_000_000 + 8 * PRICE_OUT // 1_000_000
    limit = 100 * worst
    created = await operator.CreateBudget(billing_pb2.CreateBudgetRequest(budget=billing_pb2.Budget(
        scope=billing_pb2.BudgetScope(kind=billing_pb2.SCOPE_KIND_TENANT, tenant_id="probe"),
        period=billing_pb2.BudgetPeriod(kind=billing_pb2.PERIOD_KIND_DAILY),
        amount=money_pb2.Money(currency_code="USD", micros=limit), enforcement=billing_pb2.ENFORCEMENT_HARD),
        actor="bench"), timeout=10)
    auth = await router.key("probe")

    async def one() -> pb2.CompleteResponse | grpc.StatusCode:
        try:
            return await router.stub.Complete(complete("Say hi.", 8), metadata=auth, timeout=600)
        except grpc.aio.AioRpcError as exc:
            return exc.code()

    outcomes = await asyncio.gather(*[one() for _ in range(requests)])
    await settled([router])
    served = [o for o in outcomes if isinstance(o, pb2.CompleteResponse)]
    refused = [o for o in outcomes if not isinstance(o, pb2.CompleteResponse)]
    start, end = Timestamp(), Timestamp()
    start.FromSeconds(int(time.time()) - 3600)
    end.FromSeconds(int(time.time()) + 3600)
    report = await operator.GetUsageReport(billing_pb2.GetUsageReportRequest(
        start_time=start, end_time=end, tenant_id="probe"), timeout=10)
    spent = report.total.cost.micros
    state = await operator.GetBudget(billing_pb2.GetBudgetRequest(budget_id=created.budget.budget_id), timeout=10)
    return {"requests": requests, "worst_case_micros": worst, "limit_micros": limit, "served": len(served),
            "refused": len(refused), "refused_codes": sorted({c.name for c in refused}),  # type: ignore[dict-item]
            "spent_micros": spent, "budget_spent_micros": state.status.spent_amount.micros,
            "overshoot_micros": max(spent - limit, 0), "spent_percent": round(spent * 100 / limit, 2),
            "served_cost_micros": sum(r.cost.micros for r in served)}


async def main(rounds: int, requests: int, probe_requests: int) -> None:
    configure_logging("bench", "WARNING")
    processes: list = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        try:
            metrics_port = free_port()
            billing_proc, billing = start_service("billing", ["--data-dir", str(tmp / "billing"), "--metrics-port",
                                                              str(metrics_port)], processes)
            inference_proc, inference = start_service("inference", ["--replica-id", "bench-1", "--threads", "1"],
                                                      processes)
            routers: list[Router] = []
            for name, leases in (("per_request", False), ("leases", True)):
                config = tmp / f"{name}.yaml"
                config.write_text(json.dumps({"router": {"admin_token": ADMIN_TOKEN, "data_dir": str(tmp / name),
                                                         "billing_leases": leases}}))
                proc, address = start_service("router", ["--config", str(config), "--inference", inference,
                                                         "--billing", billing], processes)
                drain(proc)
                routers.append(Router(name, address, tmp / name, proc))
            for proc in (billing_proc, inference_proc):
                drain(proc)
            floor = router_grpc.RouterServiceStub(grpc.aio.insecure_channel(start_floor(inference, processes)))
            metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
            async with operator_channel(billing, billing_token(tmp / "billing")) as channel:
                operator = billing_grpc.BillingServiceStub(channel)
                await operator.CreatePrice(billing_pb2.CreatePriceRequest(price=billing_pb2.Price(
                    model=MODEL, input_per_million=money_pb2.Money(currency_code="USD", micros=PRICE_IN),
                    output_per_million=money_pb2.Money(currency_code="USD", micros=PRICE_OUT)), actor="bench"),
                    timeout=10)
                await operator.CreateBudget(billing_pb2.CreateBudgetRequest(budget=billing_pb2.Budget(
                    scope=billing_pb2.BudgetScope(kind=billing_pb2.SCOPE_KIND_TENANT, tenant_id="bench"),
                    period=billing_pb2.BudgetPeriod(kind=billing_pb2.PERIOD_KIND_DAILY),
                    amount=money_pb2.Money(currency_code="USD", micros=10**12),
                    enforcement=billing_pb2.ENFORCEMENT_HARD), actor="bench"), timeout=10)
                await asyncio.sleep(6)  # both routers' price tables hold the new price (they reload every 5 s)
                results: dict[str, object] = {}
                for router, idle in zip(routers, routers[::-1], strict=True):
                    results[f"{router.name}_rpcs"] = await rpcs_per_1000(router, idle, metrics_url, requests)
                results["latency"] = await added_p50(routers, floor, rounds)
                results["probe"] = await probe(routers[1], operator, probe_requests)
        finally:
            stop(processes)
    leased, old = results["leases_rpcs"], results["per_request_rpcs"]
    latency, found = results["latency"], results["probe"]
    assert isinstance(leased, dict) and isinstance(old, dict) and isinstance(latency, dict)
    assert isinstance(found, dict)
    targets = [
        {"name": "billing RPCs per 1,000 requests (leases)", "measured": leased["per_1000"], "target": 20,
         "better": "lower", "anchor": f"the per-request path in the same run: {old['per_1000']} (Reserve + Settle)"},
        {"name": "router added p50 over a bare grpc.aio relay (leases)",
         "measured": latency["leases_added_over_floor_p50_ms"], "target": 0.5, "better": "lower",
         "anchor": f"same rounds; the per-request path added {latency['per_request_added_over_floor_p50_ms']} ms"},
        {"name": "probe overshoot (micro-units)", "measured": found["overshoot_micros"], "target": 0,
         "better": "lower", "anchor": f"{found['requests']} concurrent requests, hard budget of 100 worst cases"},
        {"name": "probe budget spent (%)", "measured": found["spent_percent"], "target": 95, "better": "higher",
         "anchor": "spend of the admitted requests over the budget's limit"},
    ]
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "router-leases.json").write_text(json.dumps({"results": results, "targets": targets}, indent=2) + "\n")
    print(json.dumps({"results": results, "targets": targets}, indent=2))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="billing leases against the per-request Reserve/Settle path")
    parser.add_argument("--rounds", type=int, default=300, help="interleaved latency rounds")
    parser.add_argument("--requests", type=int, default=1000, help="requests per router for the RPC count")
    parser.add_argument("--probe", type=int, default=1000, help="concurrent requests of the budget probe")
    args = parser.parse_args()
    asyncio.run(main(args.rounds, args.requests, args.probe))
