"""`make bench-router`: router overhead, cache hits, single-flight collapse and tokens/min accuracy.

Everything runs for real on 127.0.0.1, each service in its own process so that no two share an event loop
or the GIL: billing (SQLite), one inference replica with the bundled SmolLM2 INT8 model, and the router; the
client is this process. The router's added latency is the median, over interleaved rounds, of (the same
request through the router) - (that request sent to the inference replica directly), both from this client,
so the client's own cost cancels out. The same rounds also time a floor (bench/router/floor_relay.py: a bare
grpc.aio relay of Complete to Generate with none of the router's work), which separates what the router itself
adds from what any grpc.aio hop in the path costs on this machine. Writes bench/results/router.json and
router.png.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import statistics
import subprocess
import sys
import tempfile
import time
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
from services.common.ports import free_port
from tests.integration.router.conftest import ADMIN_TOKEN, MODEL
from tests.integration.router.service_process import ROOT, drain, start_service, stop

OUT = Path(__file__).resolve().parents[1] / "results"
N_LATENCY = 300
TPM = 3000
LIMIT_WINDOW_S = 60.0


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def main() -> None:
    configure_logging("bench", "WARNING")
    processes: list = []
    with tempfile.TemporaryDirectory() as tmp:
        try:
            mesh = await start_processes(Path(tmp), processes)
            results, series = await run(mesh)
        finally:
            stop(processes)
    targets = [
        {"name": "router added latency p50", "measured": results["added_latency_p50_ms"], "target": 2.0,
         "better": "lower", "anchor": "inference Generate called directly, same request, interleaved rounds in rotating order, same"
                                      f" run; a bare grpc.aio relay (the floor) added {results['floor_added_latency_p50_ms']:.2f} ms"
                                      " in the same rounds"},
        {"name": "cache hit p50", "measured": results["cache_hit_p50_ms"], "target": 2.0, "better": "lower",
         "anchor": "end-to-end Complete through the router, same run"},
        {"name": "single-flight generations for 100 identical concurrent requests",
         "measured": results["single_flight_generations"], "target": 1, "better": "lower",
         "anchor": "100 concurrent Complete calls, same run"},
        {"name": "tokens/min limit error", "measured": results["tpm_error_percent"], "target": 5.0,
         "better": "lower", "anchor": f"configured {TPM} tokens/min, measured over {LIMIT_WINDOW_S:.0f} s"},
    ]
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "router.json").write_text(json.dumps({"results": results, "targets": targets}, indent=2) + "\n")
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    axes[0].boxplot([series["direct"], series["floor"], series["router"], series["cache_hit"]], showfliers=False)
    axes[0].set_xticks([1, 2, 3, 4], ["inference\ndirect", "bare grpc.aio\nrelay", "via router", "router\ncache hit"])
    axes[0].set_ylabel("latency (ms), max_tokens=1")
    axes[0].set_title("Router overhead")
    times, cumulative = series["tpm_t"], series["tpm_tokens"]
    axes[1].plot(times, cumulative, label="tokens admitted")
    axes[1].plot([0, LIMIT_WINDOW_S], [0, TPM * LIMIT_WINDOW_S / 60], "--", label=f"limit {TPM}/min")
    axes[1].set_xlabel("s since saturation")
    axes[1].set_ylabel("tokens")
    axes[1].legend()
    axes[1].set_title("tokens/min limit")
    fig.tight_layout()
    fig.savefig(OUT / "router.png", dpi=110)
    print(json.dumps(targets, indent=2))


class ProcessMesh:
    """Addresses and stubs of the three service processes."""

    def __init__(self, router: str, inference: str, billing: str, floor: str) -> None:
        self.channel = grpc.aio.insecure_channel(router)
        self.router_stub = router_grpc.RouterServiceStub(self.channel)
        self.floor_stub = router_grpc.RouterServiceStub(grpc.aio.insecure_channel(floor))
        self.admin = admin_grpc.AdminServiceStub(self.channel)
        self.inference_address = inference
        self.billing = billing


def start_floor(inference: str, processes: list) -> str:  # type: ignore[type-arg]
    """Start bench/router/floor_relay.py in front of `inference`; returns its address."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "bench.router.floor_relay", str(port), inference],
                            cwd=ROOT, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
    processes.append(proc)
    assert proc.stdout is not None
    if proc.stdout.readline().strip() != b"ready":
        raise RuntimeError("the floor relay did not start")
    drain(proc)
    return f"127.0.0.1:{port}"


async def start_processes(tmp: Path, processes: list) -> ProcessMesh:  # type: ignore[type-arg]
    billing_proc, billing = start_service("billing", ["--data-dir", str(tmp / "billing")], processes)
    inference_proc, inference = start_service("inference", ["--replica-id", "bench-1", "--threads", "1"], processes)
    config = tmp / "mesh.yaml"
    config.write_text(json.dumps({"router": {"admin_token": ADMIN_TOKEN, "data_dir": str(tmp / "router")}}))
    router_proc, router = start_service("router", ["--config", str(config), "--inference", inference, "--billing",
                                                   billing], processes)
    for proc in (billing_proc, inference_proc, router_proc):
        drain(proc)
    mesh = ProcessMesh(router, inference, billing, start_floor(inference, processes))
    async with operator_channel(billing, billing_token(tmp / "billing")) as operator:
        await billing_grpc.BillingServiceStub(operator).CreatePrice(billing_pb2.CreatePriceRequest(price=billing_pb2.Price(
            model=MODEL, input_per_million=money_pb2.Money(currency_code="USD", micros=1_000_000),
            output_per_million=money_pb2.Money(currency_code="USD", micros=2_000_000)), actor="bench"), timeout=10)
    return mesh


async def run(mesh: ProcessMesh) -> tuple[dict[str, float], dict[str, list[float]]]:  # type: ignore[no-untyped-def]
    admin = [("authorization", f"Bearer {ADMIN_TOKEN}")]
    key = await mesh.admin.CreateApiKey(admin_pb2.CreateApiKeyRequest(tenant_id="bench"), metadata=admin)
    auth = [("authorization", f"Bearer {key.secret}")]
    one = generation_pb2.SamplingParams(temperature=0.0, max_tokens=1)
    message = generation_pb2.ChatMessage(role=generation_pb2.CHAT_ROLE_USER, content="Hi")
    inference = inf_grpc.InferenceServiceStub(grpc.aio.insecure_channel(mesh.inference_address))

    async def direct() -> float:
        start = time.perf_counter()
        async for _ in inference.Generate(inf_pb2.GenerateRequest(request_id="b", messages=[message], sampling=one)):
            pass
        return (time.perf_counter() - start) * 1000

    async def routed(policy: int) -> float:
        start = time.perf_counter()
        await mesh.router_stub.Complete(pb2.CompleteRequest(model=MODEL, messages=[message], sampling=one,
                                                            cache_policy=policy), metadata=auth)
        return (time.perf_counter() - start) * 1000

    async def floored() -> float:
        start = time.perf_counter()
        await mesh.floor_stub.Complete(pb2.CompleteRequest(model=MODEL, messages=[message], sampling=one))
        return (time.perf_counter() - start) * 1000

    async def router_call() -> float:
        return await routed(pb2.CACHE_POLICY_BYPASS)

    calls = {"direct": direct, "router": router_call, "floor": floored}
    for _ in range(10):  # warm-up
        for call in calls.values():
            await call()
    timed: dict[str, list[float]] = {name: [] for name in calls}
    orders = list(itertools.permutations(calls))
    for i in range(N_LATENCY):  # rounds, so drift hits all three alike; the order rotates so that each
        # one's work after answering (the router's usage event) precedes each of the others equally often
        for name in orders[i % len(orders)]:
            timed[name].append(await calls[name]())
    direct_ms, router_ms, floor_ms = timed["direct"], timed["router"], timed["floor"]
    added_ms = [r - d for r, d in zip(router_ms, direct_ms, strict=True)]
    floor_added_ms = [f - d for f, d in zip(floor_ms, direct_ms, strict=True)]
    over_floor_ms = [r - f for r, f in zip(router_ms, floor_ms, strict=True)]
    await routed(pb2.CACHE_POLICY_UNSPECIFIED)
    hit_ms = [await routed(pb2.CACHE_POLICY_UNSPECIFIED) for _ in range(N_LATENCY)]

    same = pb2.CompleteRequest(model=MODEL, prompt="Tell me one fact about owls.",
                               sampling=generation_pb2.SamplingParams(temperature=0.0, max_tokens=8))
    replies = await asyncio.gather(*[mesh.router_stub.Complete(same, metadata=auth) for _ in range(100)])
    generations = sum(1 for r in replies if not r.usage.cached)

    limited = await mesh.admin.CreateApiKey(admin_pb2.CreateApiKeyRequest(
        tenant_id="bench", limits=admin_pb2.KeyLimits(tokens_per_minute=TPM)), metadata=admin)
    limited_auth = [("authorization", f"Bearer {limited.secret}")]
    tpm_t, tpm_tokens = [], []
    saturated_at: float | None = None
    total = 0
    index = 0
    while saturated_at is None or time.monotonic() - saturated_at < LIMIT_WINDOW_S:
        index += 1
        request = pb2.CompleteRequest(model=MODEL, prompt=f"Say {index}.", cache_policy=pb2.CACHE_POLICY_BYPASS,
                                      sampling=generation_pb2.SamplingParams(temperature=0.0, max_tokens=2))
        started = time.monotonic()
        try:
            reply = await mesh.router_stub.Complete(request, metadata=limited_auth)
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
                raise
            if saturated_at is None:
                saturated_at = time.monotonic()
            await asyncio.sleep(0.05)
            continue
        if saturated_at is not None and started >= saturated_at:
            total += reply.usage.total_tokens
            tpm_t.append(time.monotonic() - saturated_at)
            tpm_tokens.append(total)
    measured_tpm = total * 60.0 / LIMIT_WINDOW_S
    results = {
        "direct_p50_ms": statistics.median(direct_ms), "direct_p99_ms": pct(direct_ms, 0.99),
        "router_p50_ms": statistics.median(router_ms), "router_p99_ms": pct(router_ms, 0.99),
        "added_latency_p50_ms": statistics.median(added_ms), "added_latency_p99_ms": pct(added_ms, 0.99),
        "latency_rounds": len(added_ms),
        "floor_p50_ms": statistics.median(floor_ms),
        "floor_added_latency_p50_ms": statistics.median(floor_added_ms),
        "floor_added_latency_p99_ms": pct(floor_added_ms, 0.99),
        "router_over_floor_p50_ms": statistics.median(over_floor_ms),
        "cache_hit_p50_ms": statistics.median(hit_ms), "cache_hit_p99_ms": pct(hit_ms, 0.99),
        "single_flight_requests": 100, "single_flight_generations": generations,
        "tpm_configured_tokens_per_min": TPM, "tpm_measured_tokens_per_min": measured_tpm,
        "tpm_error_percent": abs(measured_tpm - TPM) * 100.0 / TPM, "tpm_window_s": LIMIT_WINDOW_S,
    }
    results = {k: round(v, 3) if isinstance(v, float) else v for k, v in results.items()}
    print(json.dumps(results, indent=2), file=sys.stderr)
    return results, {"direct": direct_ms, "router": router_ms, "floor": floor_ms, "cache_hit": hit_ms, "tpm_t": tpm_t,
                     "tpm_tokens": [float(t) for t in tpm_tokens]}


if __name__ == "__main__":
    asyncio.run(main())
