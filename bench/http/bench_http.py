"""`make bench-http`: what the OpenAI-compatible HTTP API costs, beside LiteLLM's proxy and llama.cpp's server.

Everything runs for real on 127.0.0.1, each server in its own process: billing (SQLite), one inference
replica with the bundled SmolLM2 INT8 model, the router with its HTTP API; llama.cpp's OpenAI server on the
GGUF that model is built from, with as many threads as the replica; the LiteLLM proxy in front of that
server (bench/http/anchors.py). gRPC and HTTP both go without TLS or sidecars, as the router benchmark runs
(the settings record it). HTTP requests come from one lean client for every server (bench/http/client.py).

1. Added latency, 1-token chat completions, interleaved rounds in rotating order over five paths: Generate
   on the inference replica directly, Complete through the router (gRPC), the router's
   /v1/chat/completions, llama.cpp's server directly, LiteLLM in front of it. Figures: router HTTP p50 -
   router gRPC p50; (router HTTP p50 - inference direct p50) / (LiteLLM p50 - llama.cpp server p50).
2. Streams: 1 and 16 concurrent streamed chat completions (64 new tokens, distinct prompts, the same
   prompts for both servers, greedy), ours and llama.cpp's server taking turns round by round: TTFT (to the
   first chunk with text) and aggregate tokens/s (all streams, first request to last token).

`--quick` is a smoke test (few rounds, 4 streams, 16 tokens) that writes to the temp folder, not
bench/results.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc

from autoglm.billing.v1 import billing_service_pb2 as billing_pb2
from autoglm.billing.v1 import billing_service_pb2_grpc as billing_grpc
from autoglm.common.v1 import generation_pb2, money_pb2
from autoglm.inference.v1 import inference_service_pb2 as inf_pb2
from autoglm.inference.v1 import inference_service_pb2_grpc as inf_grpc
from autoglm.router.v1 import admin_service_pb2 as admin_pb2
from autoglm.router.v1 import admin_service_pb2_grpc as admin_grpc
from autoglm.router.v1 import router_service_pb2 as pb2
from autoglm.router.v1 import router_service_pb2_grpc as router_grpc
from bench.http import report
from bench.http.anchors import (
    LITELLM_KEY,
    LITELLM_MODEL,
    LLAMA_ALIAS,
    LLAMA_THREADS,
    start_litellm,
    start_llama_server,
    versions,
)
from bench.http.client import Connection, timed_stream
from services.cli.endpoint import billing_token, operator_channel
from services.common.logging import configure_logging
from services.common.ports import free_port
from services.inference.engine.model import find_default_model
from services.inference.modelbuild.manifest import load_manifest
from tests.integration.router.conftest import ADMIN_TOKEN, MODEL
from tests.integration.router.service_process import drain, start_service, stop

RESULTS = Path(__file__).resolve().parents[1] / "results"
FULL: dict[str, Any] = {"latency_rounds": 300, "stream_rounds": 5, "streams": (1, 16), "new_tokens": 64, "warmup": 10}
QUICK: dict[str, Any] = {"latency_rounds": 12, "stream_rounds": 1, "streams": (1, 4), "new_tokens": 16, "warmup": 3}
TOPICS = ("a lighthouse keeper", "a lost dog", "a river town", "a young baker", "an old clock", "a mountain road",
          "a busy market", "a quiet library", "a fishing boat", "a winter garden", "a travelling circus",
          "a city bus driver", "a school robot", "a desert well", "a forest fire", "a painter's cat")
HI = "Hi"
# With --budget-min, the latency rounds stop after this share of it (never before MIN_LATENCY_ROUNDS), and
# no stream round starts that would, at the pace so far, end after the rest.
LATENCY_SHARE = 0.3
MIN_LATENCY_ROUNDS = 30


def prompts(round_no: int, count: int) -> list[str]:
    """Distinct prompts, distinct in every round too (no server answers one from a cache of the last round)."""
    return [f"Story {round_no * len(TOPICS) + i}: write a long story about {TOPICS[i % len(TOPICS)]}."
            for i in range(count)]


class Mesh:
    """Billing, one inference replica and the router (gRPC and HTTP), each in its own process."""

    def __init__(self, router: str, http_port: int, inference: str, api_key: str) -> None:
        self.router = router_grpc.RouterServiceStub(grpc.aio.insecure_channel(router))
        self.inference = inf_grpc.InferenceServiceStub(grpc.aio.insecure_channel(inference))
        self.http_port = http_port
        self.api_key = api_key


async def start_mesh(tmp: Path, processes: list) -> Mesh:  # type: ignore[type-arg]
    billing_proc, billing = start_service("billing", ["--data-dir", str(tmp / "billing")], processes)
    inference_proc, inference = start_service(
        "inference", ["--replica-id", "bench-1", "--threads", str(LLAMA_THREADS)], processes)
    config = tmp / "mesh.yaml"
    config.write_text(json.dumps({"router": {"admin_token": ADMIN_TOKEN, "data_dir": str(tmp / "router")}}))
    http_port = free_port()
    router_proc, router = start_service("router", ["--config", str(config), "--inference", inference, "--billing",
                                                   billing, "--http-port", str(http_port)], processes)
    for proc in (billing_proc, inference_proc, router_proc):
        drain(proc)
    async with operator_channel(billing, billing_token(tmp / "billing")) as operator:
        await billing_grpc.BillingServiceStub(operator).CreatePrice(billing_pb2.CreatePriceRequest(price=billing_pb2.Price(
            model=MODEL, input_per_million=money_pb2.Money(currency_code="USD", micros=1_000_000),
            output_per_million=money_pb2.Money(currency_code="USD", micros=2_000_000)), actor="bench"), timeout=10)
    async with grpc.aio.insecure_channel(router) as channel:
        key = await admin_grpc.AdminServiceStub(channel).CreateApiKey(
            admin_pb2.CreateApiKeyRequest(tenant_id="bench"), metadata=[("authorization", f"Bearer {ADMIN_TOKEN}")])
    return Mesh(router, http_port, inference, key.secret)


def chat_body(model: str, content: str, max_tokens: int, **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
            "temperature": 0, **extra}


async def checked_post(conn: Connection, body: dict[str, Any]) -> None:
    status, answer = await conn.post("/v1/chat/completions", body)
    if status != 200:
        raise RuntimeError(f"{conn.host}:{conn.port} answered {status}: {answer[:500]!r}")


async def latency(mesh: Mesh, llama_port: int, litellm_port: int, plan: dict[str, Any]) -> dict[str, list[float]]:
    one = generation_pb2.SamplingParams(temperature=0.0, max_tokens=1)
    message = generation_pb2.ChatMessage(role=generation_pb2.CHAT_ROLE_USER, content=HI)
    auth = [("authorization", f"Bearer {mesh.api_key}")]
    ours = Connection("127.0.0.1", mesh.http_port, mesh.api_key)
    llama = Connection("127.0.0.1", llama_port)
    litellm = Connection("127.0.0.1", litellm_port, LITELLM_KEY)

    async def grpc_direct() -> None:
        async for _ in mesh.inference.Generate(inf_pb2.GenerateRequest(request_id="bench", messages=[message],
                                                                       sampling=one), timeout=60):
            pass

    async def grpc_router() -> None:
        await mesh.router.Complete(pb2.CompleteRequest(model=MODEL, messages=[message], sampling=one,
                                                       cache_policy=pb2.CACHE_POLICY_BYPASS), metadata=auth, timeout=60)

    calls: dict[str, Callable[[], Awaitable[None]]] = {
        "grpc_direct": grpc_direct, "grpc_router": grpc_router,
        "http_router": lambda: checked_post(ours, chat_body(MODEL, HI, 1, cache_policy="bypass")),
        "llama_direct": lambda: checked_post(llama, chat_body(LLAMA_ALIAS, HI, 1)),
        "litellm": lambda: checked_post(litellm, chat_body(LITELLM_MODEL, HI, 1)),
    }
    for _ in range(plan["warmup"]):  # the same warm-up for every path
        for call in calls.values():
            await call()
    timed: dict[str, list[float]] = {name: [] for name in calls}
    orders = list(itertools.permutations(calls))
    deadline = time.monotonic() + plan["budget_s"] * LATENCY_SHARE
    for i in range(plan["latency_rounds"]):
        if i >= MIN_LATENCY_ROUNDS and time.monotonic() > deadline:
            print(f"latency: time budget spent after {i} rounds", file=sys.stderr, flush=True)
            break  # rounds, so drift hits every path alike; the order rotates so
        # that each one's work after answering precedes each of the others equally often
        for name in orders[i * 7 % len(orders)]:
            start = time.perf_counter()
            await calls[name]()
            timed[name].append((time.perf_counter() - start) * 1000)
    for conn in (ours, llama, litellm):
        await conn.close()
    return timed


async def stream_round(conns: list[Connection], body: Callable[[str], dict[str, Any]],
                       texts: list[str]) -> dict[str, Any]:
    start = time.perf_counter()
    runs = await asyncio.gather(*(timed_stream(conn, body(text)) for conn, text in zip(conns, texts, strict=False)))
    elapsed = time.perf_counter() - start
    if any(not run.tokens for run in runs):
        raise RuntimeError("a stream ended without any text")
    return {"ttft_ms": [run.ttft_s * 1000 for run in runs], "tokens": [run.tokens for run in runs],
            "content_chunks": [run.content_chunks for run in runs], "elapsed_s": elapsed, "aggregate_tok_s": sum(run.tokens for run in runs) / elapsed,
            "median_ttft_ms": statistics.median(run.ttft_s * 1000 for run in runs)}


async def streams(mesh: Mesh, llama_port: int, plan: dict[str, Any]) -> dict[str, dict[str, list[dict[str, Any]]]]:
    most = max(plan["streams"])
    pools = {"ours": [Connection("127.0.0.1", mesh.http_port, mesh.api_key) for _ in range(most)],
             "llama_cpp_server": [Connection("127.0.0.1", llama_port) for _ in range(most)]}
    usage = {"stream_options": {"include_usage": True}}
    bodies: dict[str, Callable[[int], Callable[[str], dict[str, Any]]]] = {
        "ours": lambda n: lambda text: chat_body(MODEL, text, n, cache_policy="bypass", **usage),
        "llama_cpp_server": lambda n: lambda text: chat_body(LLAMA_ALIAS, text, n, **usage),
    }
    for server in pools:  # the same warm-up for both
        await stream_round(pools[server][:1], bodies[server](8), ["Say hello."])
        await stream_round(pools[server][:2], bodies[server](8), ["Say hello.", "Say goodbye."])
    out: dict[str, dict[str, list[dict[str, Any]]]] = {server: {str(n): [] for n in plan["streams"]}
                                                       for server in pools}
    started = time.monotonic()
    for round_no in range(plan["stream_rounds"]):
        spent = time.monotonic() - started
        if round_no and spent + spent / round_no > plan["budget_s"] * (1 - LATENCY_SHARE):
            print(f"streams: time budget spent after {round_no} rounds", file=sys.stderr, flush=True)
            break
        order = list(pools) if round_no % 2 == 0 else list(reversed(pools))
        for n in plan["streams"]:
            texts = prompts(round_no, n)
            for server in order:
                print(f"streams round {round_no + 1}/{plan['stream_rounds']}: {server}, {n}", file=sys.stderr,
                      flush=True)
                out[server][str(n)].append(await stream_round(pools[server][:n], bodies[server](plan["new_tokens"]),
                                                              texts))
    for pool in pools.values():
        for conn in pool:
            await conn.close()
    return out


async def run(plan: dict[str, Any]) -> dict[str, Any]:
    gguf = Path(load_manifest(find_default_model()).source.path)
    processes: list = []  # type: ignore[type-arg]
    with tempfile.TemporaryDirectory(prefix="bench-http-") as tmp:
        try:
            mesh = await start_mesh(Path(tmp), processes)
            llama_port, buffers = await start_llama_server(gguf, Path(tmp), processes)
            litellm_port = await start_litellm(llama_port, Path(tmp), processes)
            print("servers up; 1-token latency rounds", file=sys.stderr, flush=True)
            timed = await latency(mesh, llama_port, litellm_port, plan)
            return {"latency_ms": timed, "streams": await streams(mesh, llama_port, plan), "gguf": gguf.name,
                    "llama_buffers": buffers}
        finally:
            stop(processes)


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke test: few rounds, written to the temp folder")
    parser.add_argument("--latency-rounds", type=int, help="1-token latency rounds (default: 300, --quick 12)")
    parser.add_argument("--stream-rounds", type=int, help="stream rounds (default: 5, --quick 1)")
    parser.add_argument("--budget-min", type=float, default=0.0,
                        help="stop starting rounds after about this many minutes (a busy machine); 0: no limit")
    parser.add_argument("--out", type=Path, default=None, help="where to write http.json and http.png")
    args = parser.parse_args()
    configure_logging("bench", "WARNING")
    plan = {**(QUICK if args.quick else FULL), "budget_s": args.budget_min * 60 or float("inf")}
    for name in ("latency_rounds", "stream_rounds"):
        if getattr(args, name):
            plan[name] = getattr(args, name)
    out = args.out or (Path(tempfile.gettempdir()) / "autoglm-bench-http-quick" if args.quick else RESULTS)
    load = os.getloadavg()
    raw = asyncio.run(run(plan))
    gguf, buffers = raw.pop("gguf"), raw.pop("llama_buffers")
    planned = {k: list(v) if isinstance(v, tuple) else v for k, v in plan.items() if k != "budget_s"}
    settings = {
        "quick": args.quick, **planned, "planned_rounds": {k: plan[k] for k in ("latency_rounds", "stream_rounds")},
        "latency_rounds": len(raw["latency_ms"]["http_router"]),
        "stream_rounds": len(raw["streams"]["ours"]["1"]), "budget_min": args.budget_min or None,
        "transport": "plaintext gRPC and HTTP alike (no TLS, no sidecars)",
        "client": "one keep-alive HTTP/1.1 connection per stream (asyncio + httptools) for every HTTP server; "
                  "grpc.aio for gRPC",
        "greedy": True, "threads": LLAMA_THREADS, "model": MODEL, "gguf": gguf,
        "latency_request": f"chat completion, one user message {HI!r}, max_tokens=1, temperature 0, cache bypassed",
        "stream_request": "streamed chat completion, stream_options.include_usage, temperature 0, cache bypassed; "
                          "EOS not suppressed (neither API offers it): tokens per stream are recorded and compared",
        "prompts_round_0": prompts(0, max(plan["streams"])),
        "inference": {"threads": LLAMA_THREADS, "scheduler": "defaults (max_batch_size 16)"},
        "llama_server": {"command": f"python -m llama_cpp.server --model {gguf} --model_alias {LLAMA_ALIAS} "
                                    f"--n_threads {LLAMA_THREADS} --n_threads_batch {LLAMA_THREADS} "
                                    "--interrupt_requests False", "n_threads": LLAMA_THREADS, "n_threads_batch": LLAMA_THREADS, "interrupt_requests": False,
                         "weight_buffers": buffers if buffers == "default" else
                         "plain CPU buffers (bench/http/llama_server.py): its AMX/repacked buffers died with a signal "
                         "on this CPU"},
        "litellm": {"workers": 1, "database": None, "LITELLM_LOCAL_MODEL_COST_MAP": "True"},
        "versions": versions(),
        "ratios": "targets: median over rounds of ours / anchor within a round (latency: ratio of p50 differences); "
                  "results.ratios_of_medians gives the ratios of the medians",
    }
    machine = {"cpus": os.cpu_count(), "cpu": cpu_model(), "python": platform.python_version(),
               "load_average_at_start": [round(x, 2) for x in load],
               "load_average_at_end": [round(x, 2) for x in os.getloadavg()]}
    document = report.write(raw, settings, machine, out)
    print(json.dumps({"results": {k: v for k, v in document["results"].items() if k != "raw"},
                      "targets": document["targets"]}, indent=2))
    print(f"wrote {out / 'http.json'} and {out / 'http.png'}", file=sys.stderr)


if __name__ == "__main__":
    main()
