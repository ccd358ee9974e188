"""`make bench-router`: router overhead, cache hits, single-flight collapse and tokens/min accuracy.

Everything runs for real in one process on 127.0.0.1: billing (SQLite), one inference replica with the
bundled SmolLM2 INT8 model, and the router. Writes bench/results/router.json and router.png.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import grpc
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from autoglm.common.v1 import generation_pb2
from autoglm.inference.v1 import inference_service_pb2 as inf_pb2
from autoglm.inference.v1 import inference_service_pb2_grpc as inf_grpc
from autoglm.router.v1 import admin_service_pb2 as admin_pb2
from autoglm.router.v1 import router_service_pb2 as pb2
from services.common.logging import configure_logging
from services.inference.config import InferenceConfig
from services.inference.engine.model import load_model
from tests.integration.router.conftest import ADMIN_TOKEN, MODEL, start_mesh

OUT = Path(__file__).resolve().parents[1] / "results"
N_LATENCY = 100
TPM = 3000
LIMIT_WINDOW_S = 60.0


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def main() -> None:
    configure_logging("bench", "WARNING")
    servers = []

    async def serve(build):  # type: ignore[no-untyped-def]
        server = await build
        servers.append(server)
        return server

    model = load_model(None, InferenceConfig(intra_op_threads=1).session)
    with tempfile.TemporaryDirectory() as tmp:
        mesh = await start_mesh(serve, Path(tmp), model)
        try:
            results, series = await run(mesh)
        finally:
            for server in reversed(servers):
                await server.stop(0)
    targets = [
        {"name": "router added latency p50", "measured": results["added_latency_p50_ms"], "target": 2.0,
         "better": "lower", "anchor": "inference Generate called directly, same request, same run"},
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
    axes[0].boxplot([series["direct"], series["router"], series["cache_hit"]], showfliers=False)
    axes[0].set_xticks([1, 2, 3], ["inference direct", "via router", "router cache hit"])
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


async def run(mesh) -> tuple[dict[str, float], dict[str, list[float]]]:  # type: ignore[no-untyped-def]
    admin = [("authorization", f"Bearer {ADMIN_TOKEN}")]
    key = await mesh.admin.CreateApiKey(admin_pb2.CreateApiKeyRequest(tenant_id="bench"), metadata=admin)
    auth = [("authorization", f"Bearer {key.secret}")]
    one = generation_pb2.SamplingParams(temperature=0.0, max_tokens=1)
    message = generation_pb2.ChatMessage(role=generation_pb2.CHAT_ROLE_USER, content="Hi")
    inference = inf_grpc.InferenceServiceStub(grpc.aio.insecure_channel(mesh.inference.address))

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

    for _ in range(10):  # warm-up
        await direct()
        await routed(pb2.CACHE_POLICY_BYPASS)
    direct_ms, router_ms = [], []
    for _ in range(N_LATENCY):  # interleaved so drift hits both equally
        direct_ms.append(await direct())
        router_ms.append(await routed(pb2.CACHE_POLICY_BYPASS))
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
        "added_latency_p50_ms": statistics.median(router_ms) - statistics.median(direct_ms),
        "added_latency_p99_ms": pct(router_ms, 0.99) - pct(direct_ms, 0.99),
        "cache_hit_p50_ms": statistics.median(hit_ms), "cache_hit_p99_ms": pct(hit_ms, 0.99),
        "single_flight_requests": 100, "single_flight_generations": generations,
        "tpm_configured_tokens_per_min": TPM, "tpm_measured_tokens_per_min": measured_tpm,
        "tpm_error_percent": abs(measured_tpm - TPM) * 100.0 / TPM, "tpm_window_s": LIMIT_WINDOW_S,
    }
    results = {k: round(v, 3) if isinstance(v, float) else v for k, v in results.items()}
    print(json.dumps(results, indent=2), file=sys.stderr)
    return results, {"direct": direct_ms, "router": router_ms, "cache_hit": hit_ms, "tpm_t": tpm_t,
                     "tpm_tokens": [float(t) for t in tpm_tokens]}


if __name__ == "__main__":
    asyncio.run(main())
