"""Full-mesh load: N concurrent streaming clients for D seconds through router + sidecars, then the
same load straight at one inference replica (no router, no sidecars) as the anchor.

    python -m bench.mesh.run [--clients 200] [--duration 60] [--max-tokens 32]

Writes bench/results/mesh.json and bench/results/mesh.png: error rate, aggregate tokens/s, TTFT
p50/p99 and every process's RSS over time, for both runs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from autoglm.common.v1 import generation_pb2
from autoglm.inference.v1 import inference_service_pb2, inference_service_pb2_grpc
from autoglm.router.v1 import router_service_pb2, router_service_pb2_grpc
from tests.e2e.mesh_client import router_channel
from tests.e2e.mesh_process import start_mesh, stop_mesh


def load_endpoint_inference(mesh) -> str:  # type: ignore[no-untyped-def]
    """The first inference replica's own loopback address (the launcher logs it as the child's ready address)."""
    for pid, role in processes_of(mesh).items():
        if role == "inference-0":
            text = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            port = text[text.index(b"--port") + 1].decode()
            return f"127.0.0.1:{port}"
    raise LookupError("inference-0 not found")

RESULTS = Path(__file__).resolve().parent.parent / "results"
PROMPTS = [
    "Give me one tip for writing clear emails.",
    "What is a good name for a grey cat?",
    "Explain what a kilometre is in one sentence.",
    "List two fruits that are yellow.",
    "Why do people drink water?",
    "Describe the colour of the sky at noon.",
    "Suggest a short title for a story about a lighthouse.",
    "What does a baker make?",
]


@dataclass
class LoadStats:
    ok: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    tokens: int = 0
    ttft_ms: list[float] = field(default_factory=list)
    tokens_per_second_timeline: list[tuple[float, int]] = field(default_factory=list)


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def rss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def processes_of(mesh) -> dict[int, str]:  # type: ignore[no-untyped-def]
    """The mesh's processes (they carry AUTOGLM_MESH) named by role: service, sidecar or envoy."""
    found = {}
    for pid in mesh.descendants():
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        text = b" ".join(cmd).decode(errors="replace")
        if "services." in text:
            role = text.split("-m ")[1].split()[0].removeprefix("services.")
            if "--replica-id" in text:
                role = text.split("--replica-id ")[1].split()[0]
        elif "-m sidecar" in text:
            role = "sidecar-" + text.split("--service ")[1].split()[0]
        elif "envoy" in text:
            role = "envoy"
        else:
            role = "launcher"
        found[pid] = role
    return found


async def sample_memory(pids: dict[int, str], stop: asyncio.Event, out: dict[str, list[tuple[float, int]]]) -> None:
    begin = time.monotonic()
    while not stop.is_set():
        now = time.monotonic() - begin
        for pid, name in pids.items():
            out.setdefault(f"{name}[{pid}]", []).append((now, rss_kib(pid)))
        try:
            await asyncio.wait_for(stop.wait(), 1.0)
        except TimeoutError:
            pass


async def drive(make_call, clients: int, duration_s: float, stats: LoadStats) -> None:  # type: ignore[no-untyped-def]
    end = time.monotonic() + duration_s
    begin = time.monotonic()
    second_tokens: Counter[int] = Counter()

    async def client(index: int) -> None:
        n = 0
        while time.monotonic() < end:
            prompt = PROMPTS[(index + n) % len(PROMPTS)]
            n += 1
            start = time.monotonic()
            first = None
            try:
                async for tokens in make_call(prompt):
                    if tokens and first is None:
                        first = time.monotonic()
                        stats.ttft_ms.append((first - start) * 1000)
                    stats.tokens += tokens
                    second_tokens[int(time.monotonic() - begin)] += tokens
                stats.ok += 1
            except grpc.aio.AioRpcError as error:
                stats.errors[error.code().name] += 1

    await asyncio.gather(*(client(i) for i in range(clients)))
    stats.tokens_per_second_timeline = sorted(second_tokens.items())


def router_caller(mesh, key: str, max_tokens: int):  # type: ignore[no-untyped-def]
    channel = router_channel(mesh)
    stub = router_service_pb2_grpc.RouterServiceStub(channel)
    metadata = (("authorization", f"Bearer {key}"),)

    async def call(prompt: str):  # type: ignore[no-untyped-def]
        request = router_service_pb2.GenerateRequest(
            model="smollm2-135m-instruct", prompt=prompt, cache_policy=router_service_pb2.CACHE_POLICY_BYPASS,
            sampling=generation_pb2.SamplingParams(max_tokens=max_tokens, temperature=0.7, seed=7),
        )
        async for message in stub.Generate(request, metadata=metadata, timeout=600):
            yield message.delta_tokens

    return channel, call


def inference_caller(address: str, max_tokens: int):  # type: ignore[no-untyped-def]
    channel = grpc.aio.insecure_channel(address)
    stub = inference_service_pb2_grpc.InferenceServiceStub(channel)

    async def call(prompt: str):  # type: ignore[no-untyped-def]
        request = inference_service_pb2.GenerateRequest(
            messages=[generation_pb2.ChatMessage(role=generation_pb2.CHAT_ROLE_USER, content=prompt)],
            sampling=generation_pb2.SamplingParams(max_tokens=max_tokens, temperature=0.7, seed=7),
        )
        async for message in stub.Generate(request, timeout=600):
            yield len(message.token_ids)

    return channel, call


def summarize(stats: LoadStats, duration_s: float, memory: dict[str, list[tuple[float, int]]]) -> dict:
    total = stats.ok + sum(stats.errors.values())
    timeline = dict(stats.tokens_per_second_timeline)
    steady = [timeline.get(s, 0) for s in range(int(duration_s * 0.25), int(duration_s))]
    warm = {}
    for name, series in memory.items():
        after = [kib for t, kib in series if t >= duration_s * 0.25]
        if after:
            warm[name] = {"rss_mib_after_warmup_first": after[0] / 1024, "rss_mib_last": after[-1] / 1024,
                          "rss_mib_max": max(after) / 1024, "growth_mib": (after[-1] - after[0]) / 1024}
    return {
        "requests": total, "ok": stats.ok, "errors": dict(stats.errors),
        "error_rate": (total - stats.ok) / total if total else float("nan"),
        "tokens": stats.tokens, "aggregate_tokens_per_s": stats.tokens / duration_s,
        "steady_tokens_per_s": sum(steady) / len(steady) if steady else float("nan"),
        "ttft_ms_p50": percentile(stats.ttft_ms, 0.5), "ttft_ms_p99": percentile(stats.ttft_ms, 0.99),
        "memory": warm,
    }


async def run_mesh_load(args: argparse.Namespace, tmp: Path) -> tuple[dict, dict, dict, dict]:
    procs: list[subprocess.Popen[bytes]] = []
    extra = {"inference": {"max_batch_size": args.max_batch, "queue_capacity": max(256, args.clients * 2)}}
    mesh = start_mesh(tmp / "mesh", procs, extra_args=tuple(args.up_args.split()), extra_config=extra)
    try:
        key = (mesh.data_dir / "demo_api_key").read_text().strip()
        pids = processes_of(mesh)
        memory: dict[str, list[tuple[float, int]]] = {}
        stop = asyncio.Event()
        sampler = asyncio.create_task(sample_memory(pids, stop, memory))
        channel, call = router_caller(mesh, key, args.max_tokens)
        stats = LoadStats()
        await drive(call, args.clients, args.duration, stats)
        stop.set()
        await sampler
        await channel.close()
        mesh_result = summarize(stats, args.duration, memory)

        # Anchor: the same load straight at the first inference replica of the same mesh (its own
        # loopback port, behind no sidecar and no router).
        memory_direct: dict[str, list[tuple[float, int]]] = {}
        stop = asyncio.Event()
        sampler = asyncio.create_task(sample_memory(pids, stop, memory_direct))
        channel, call = inference_caller(load_endpoint_inference(mesh), args.max_tokens)
        direct = LoadStats()
        await drive(call, args.clients, args.duration, direct)
        stop.set()
        await sampler
        await channel.close()
        direct_result = summarize(direct, args.duration, memory_direct)
        return mesh_result, direct_result, {"timeline": stats.tokens_per_second_timeline, "memory": memory}, {
            "timeline": direct.tokens_per_second_timeline}
    finally:
        stop_mesh(mesh)


def plot(path: Path, mesh_series: dict, direct_series: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(10, 8))
    for label, series in (("full mesh", mesh_series["timeline"]), ("inference only", direct_series["timeline"])):
        ax1.plot([t for t, _ in series], [n for _, n in series], label=label)
    ax1.set_xlabel("s")
    ax1.set_ylabel("tokens / s")
    ax1.set_title("Aggregate tokens per second")
    ax1.legend()
    for name, series in mesh_series["memory"].items():
        ax2.plot([t for t, _ in series], [kib / 1024 for _, kib in series], label=name)
    ax2.set_xlabel("s")
    ax2.set_ylabel("RSS MiB")
    ax2.set_title("Process memory under full-mesh load")
    ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--duration", type=float, default=60.0)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--up-args", default="", help="extra `autoglm up` flags in one string, e.g. '--sidecar python'")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        mesh_result, direct_result, mesh_series, direct_series = asyncio.run(run_mesh_load(args, Path(tmp)))
    ratio = mesh_result["aggregate_tokens_per_s"] / direct_result["aggregate_tokens_per_s"]
    growth = max((m["growth_mib"] for m in mesh_result["memory"].values()), default=0.0)
    report = {
        "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0], "platform": platform.platform()},
        "config": vars(args),
        "results": {
            "full_mesh": {**mesh_result, "units": {"aggregate_tokens_per_s": "tokens/s", "ttft_ms_p50": "ms",
                                                   "ttft_ms_p99": "ms", "error_rate": "fraction"}},
            "inference_only": direct_result,
        },
        "targets": [
            {"name": f"full-mesh error rate at {args.clients} concurrent streams",
             "measured": mesh_result["error_rate"], "target": 0.0, "better": "lower", "anchor": None},
            {"name": "full-mesh aggregate tokens/s / inference-only tokens/s (same run)",
             "measured": ratio, "target": 0.85, "better": "higher", "anchor": "inference_only.aggregate_tokens_per_s"},
            {"name": "largest RSS growth of any process after warm-up (MiB)",
             "measured": growth, "target": 64.0, "better": "lower", "anchor": None},
        ],
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "mesh.json").write_text(json.dumps(report, indent=2, default=str))
    plot(RESULTS / "mesh.png", mesh_series, direct_series)
    print(json.dumps(report["targets"], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
