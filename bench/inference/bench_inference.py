"""`make bench-inference`: TTFT, batch-1 decode, aggregate tokens/s at 1/4/8/16/32 streams (the engine
in-process and the gRPC service in its own process, as a user runs it), RSS of the service with 32
active sequences of 512 tokens, its peak RSS with 1 sequence of 7,000 tokens beside 15 of 100
(`--only kv-rss` measures just that, into bench/results/inference-kv-rss.json), the chat figures of
chat.py (`--only chat`, into bench/results/inference-chat.json), what each build computes (quality.py,
`--only quality`: perplexity on the build tests' text, into bench/results/inference-quality.json), and in the same run the anchors on the same model and CPU:
llama.cpp (llama-cpp-python on the GGUF as shipped, Q4_1, and requantized by llama.cpp to Q8_0) and
onnxruntime-genai's Generator on its builder's INT8 and INT4 models (bench/inference/anchors.py: same
block size, accuracy level and intra-op threads, the same 16 distinct prompts at batch 16, the same
new tokens per row, recorded in `new_tokens_per_row`), beside this engine's INT8 and INT4 builds
through gRPC. `--quick`: one round of the runners into the temp folder. Runners take turns round by round so that load from other work on the machine spreads
evenly over them; every figure is the median of its rounds. Writes bench/results/inference.{json,png}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import onnxruntime
import yaml

from autoglm.common.v1 import generation_pb2
from autoglm.inference.v1 import inference_service_pb2 as pb2
from autoglm.inference.v1 import inference_service_pb2_grpc as pb2_grpc
from bench.inference.anchors import bench_cache, genai_model, llama_int8_gguf, run_isolated
from bench.inference.chat import chat_bench, chat_entries
from bench.inference.quality import quality, quality_entries
from services.common.config import ServerSettings
from services.common.generation import Sampling
from services.inference.config import InferenceConfig
from services.inference.engine.engine import Engine
from services.inference.engine.model import LoadedModel, load_model
from services.inference.engine.session import default_threads
from services.inference.engine.types import GenerationRequest

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "bench" / "results"
STREAMS = (1, 4, 8, 16, 32)
PROMPT_TOKENS = 108
NEW_TOKENS = 128
ROUNDS = 5
# Extra back-to-back engine/gRPC single-stream pairs (order alternating) for the gRPC/in-process ratio,
# which is a few percent either way and so needs more pairs than the anchors' rounds give.
EXTRA_PAIRS = 10
SWEEP_REPEATS = 3
RSS_PROMPT, RSS_STREAMS, RSS_NEW = 500, 32, 12  # 32 sequences of 512 tokens
KV_LONG, KV_SHORT, KV_SHORTS, KV_NEW = 7000, 100, 15, 32  # 1 long prompt beside 15 short ones
KV_RSS_FACTOR = 1.3
MIB = 1 << 20
SENTENCE = "The history of the river valley shows how farmers, traders and builders shaped the land. "
ISSUE_TABLE = {"llama.cpp": {"ttft_ms": 250, "batch1_tok_s": 150},
               "onnxruntime-genai": {"ttft_ms": 79, "batch1_tok_s": 166, "batch16_tok_s": 648}}
# (seconds to first token, seconds in all, tokens)
Stream = Callable[[str, int], Awaitable[tuple[float, float, int]]]


def prompt_ids(model: LoadedModel, tokens: int, salt: int = 0) -> list[int]:
    text = f"Story {salt}. "
    while len(model.encode(text)) < tokens:
        text += SENTENCE
    return model.encode(text)[:tokens]


def prompt_of(model: LoadedModel, tokens: int, salt: int = 0) -> str:
    return model.decode(prompt_ids(model, tokens, salt))


def engine_stream(engine: Engine) -> Stream:
    async def run(prompt: str, max_tokens: int) -> tuple[float, float, int]:
        start, first, tokens = time.perf_counter(), 0.0, 0
        request = GenerationRequest(prompt=prompt, sampling=Sampling(max_tokens=max_tokens))
        async for delta in engine.generate(request):
            if not first:
                first = time.perf_counter() - start
            tokens += len(delta.token_ids)
        return first, time.perf_counter() - start, tokens
    return run


def grpc_stream(stub: pb2_grpc.InferenceServiceStub) -> Stream:
    async def run(prompt: str, max_tokens: int) -> tuple[float, float, int]:
        start, first, tokens = time.perf_counter(), 0.0, 0
        req = pb2.GenerateRequest(prompt=prompt, sampling=generation_pb2.SamplingParams(max_tokens=max_tokens))
        async for message in stub.Generate(req, timeout=600):
            if not first:
                first = time.perf_counter() - start
            tokens += len(message.token_ids)
        return first, time.perf_counter() - start, tokens
    return run


async def single(run: Stream, prompt: str) -> dict[str, float]:
    first, total, tokens = await run(prompt, NEW_TOKENS)
    return {"ttft_ms": first * 1000, "decode_tok_s": (tokens - 1) / (total - first), "tokens": tokens}


async def aggregate(run: Stream, prompts: list[str]) -> float:
    """Tokens/s over all streams, from the first request to the last token (prefill included)."""
    start = time.perf_counter()
    results = await asyncio.gather(*(run(p, NEW_TOKENS) for p in prompts))
    return sum(r[2] for r in results) / (time.perf_counter() - start)


async def stream_sweep(local: Stream, remote: Stream, prompts: list[str],
                       rounds: dict[str, list[Any]]) -> dict[str, dict[int, float]]:
    """Aggregate tokens/s by concurrent streams, engine and gRPC taking turns, median of
    SWEEP_REPEATS (16 streams: the median of the rounds already measured)."""
    runs: dict[str, dict[int, list[float]]] = {"engine": {}, "grpc": {}}
    for _ in range(SWEEP_REPEATS):
        for n in (n for n in STREAMS if n != 16):
            runs["engine"].setdefault(n, []).append(await aggregate(local, prompts[:n]))
            runs["grpc"].setdefault(n, []).append(await aggregate(remote, prompts[:n]))
    runs["engine"][16], runs["grpc"][16] = rounds["engine16"], rounds["grpc16"]
    return {path: {n: statistics.median(by_n[n]) for n in STREAMS} for path, by_n in runs.items()}


class Service:
    """`python -m services.inference` in its own process, as the launcher starts a replica."""

    def __init__(self, config: dict[str, Any]) -> None:
        self._dir = tempfile.TemporaryDirectory(prefix="bench-inference-")
        path = Path(self._dir.name) / "mesh.yaml"
        path.write_text(yaml.safe_dump({"inference": config}))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "services.inference", "--port", "0", "--config", str(path),
             "--replica-id", "bench"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            start_new_session=True)
        assert self.proc.stdout is not None
        self.address = ""
        for raw in self.proc.stdout:
            if found := re.search(r"listening on (\S+:\d+)", raw.decode()):
                self.address = found.group(1)
                break
        if not self.address:
            raise RuntimeError(f"the inference service did not start (exit {self.proc.wait()})")

    def rss_mb(self) -> float:
        return _status_mb(self.proc.pid, "VmRSS")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._dir.cleanup()


def _status_mb(pid: int, key: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{key}:"):
            return int(line.split()[1]) / 1024
    return 0.0


def reset_peak_rss(pid: int) -> None:
    """VmHWM restarts from the current RSS (Linux clear_refs)."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


def model_bytes(model: LoadedModel) -> int:
    """The weights on disk (the graph and its external data)."""
    return sum(p.stat().st_size for p in model.directory.glob(f"{model.manifest.model_file}*"))


async def kv_rss(model: LoadedModel, threads: int, prefix_cache: bool = True) -> dict[str, Any]:
    """Peak RSS of a replica (default settings, or with its prefix cache off) running 1 prompt of KV_LONG
    tokens beside KV_SHORTS of KV_SHORT, all at once, KV_NEW new tokens each; KV bytes are the tokens they
    cached. With the prefix cache on, its pool (up to `prefix_cache_bytes`) holds copies of their prompt
    blocks on top: the figure says how much."""
    long_prompt = prompt_of(model, KV_LONG, 0)
    shorts = [prompt_of(model, KV_SHORT, salt) for salt in range(1, KV_SHORTS + 1)]
    config: dict[str, Any] = {"model_dir": str(model.directory), "intra_op_threads": threads}
    if not prefix_cache:
        config["prefix_cache"] = False
    service = Service(config)
    try:
        async with grpc.aio.insecure_channel(service.address) as channel:
            stub = pb2_grpc.InferenceServiceStub(channel)
            await grpc_stream(stub)(shorts[0], 4)
            idle = service.rss_mb()
            reset_peak_rss(service.proc.pid)
            start = time.perf_counter()

            async def usage(prompt: str) -> int:
                req = pb2.GenerateRequest(prompt=prompt, sampling=generation_pb2.SamplingParams(max_tokens=KV_NEW))
                messages = [m async for m in stub.Generate(req, timeout=1800)]
                return messages[-1].usage.total_tokens

            tokens = await asyncio.gather(usage(long_prompt), *(usage(p) for p in shorts))
            seconds = time.perf_counter() - start
            peak = _status_mb(service.proc.pid, "VmHWM")
    finally:
        service.stop()
    kv = sum(tokens) * model.spec.bytes_per_token / MIB
    weights = model_bytes(model) / MIB
    return {"peak_rss_mb": peak, "idle_rss_mb": idle, "kv_mb": kv, "model_mb": weights, "tokens": sum(tokens),
            "seconds": seconds, "target_mb": KV_RSS_FACTOR * (weights + kv), "prefix_cache": prefix_cache}


def kv_rss_entries(out: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(results entry, target entry) of the kv-rss figure."""
    result = {"value": out["peak_rss_mb"], "unit": "MB (MiB) peak RSS (VmHWM)",
              "sequences": f"1 x {KV_LONG} + {KV_SHORTS} x {KV_SHORT} prompt tokens, {KV_NEW} new tokens each",
              **{k: v for k, v in out.items() if k != "peak_rss_mb"}}
    cache = "prefix cache on (default)" if out.get("prefix_cache", True) else "prefix cache off"
    goal = target(f"peak RSS MB, 1 sequence of {KV_LONG} tokens beside {KV_SHORTS} of {KV_SHORT}, {cache}",
                  out["peak_rss_mb"], out["target_mb"], "lower",
                  f"{KV_RSS_FACTOR} x (model weights {out['model_mb']:.0f} MiB + the sequences' KV-cache "
                  f"{out['kv_mb']:.0f} MiB); the replica idles at {out['idle_rss_mb']:.0f} MiB")
    return result, goal


async def watch_peak_rss(service: Service, stub: pb2_grpc.InferenceServiceStub, active: int) -> float:
    """Largest service RSS seen in WatchLoad reports (every 50 ms) while `active` sequences run."""
    peak = 0.0
    async for report in stub.WatchLoad(pb2.WatchLoadRequest(interval_ms=50)):
        if report.active_sequences >= active:
            peak = max(peak, service.rss_mb())
        elif peak:
            return peak
    return peak


async def bench(model: LoadedModel, threads: int, quick: bool = False) -> dict[str, Any]:
    """Every figure; `quick`: one round of ours and the anchors only (a smoke test of the runners)."""
    gguf = Path(model.manifest.source.path)
    for precision in ("int8", "int4"):
        try:
            genai_model(gguf, bench_cache(), precision)  # built once, before anything is timed
        except Exception as err:  # the genai rounds report the reason
            print(f"onnxruntime-genai {precision} model: {err}", file=sys.stderr)
    try:
        int8_gguf: Path | None = llama_int8_gguf(gguf, bench_cache())
    except Exception as err:  # its rounds report that it is missing
        print(f"llama.cpp Q8_0 model: {err}", file=sys.stderr)
        int8_gguf = None
    ids = prompt_ids(model, PROMPT_TOKENS)
    prompt = model.decode(ids)
    many = [prompt_of(model, PROMPT_TOKENS, salt) for salt in range(max(STREAMS))]
    sixteen = json.dumps([prompt_ids(model, PROMPT_TOKENS, salt) for salt in range(16)])  # = many[:16], as ids
    settings = {"max_batch_size": 32, "decode_rows": 32, "max_batched_tokens": 512, "intra_op_threads": threads}
    config = replace(InferenceConfig(server=ServerSettings(port=0)), max_batch_size=32, decode_rows=32,
                     max_batched_tokens=512, intra_op_threads=threads)
    engine = Engine(model, config.scheduler, "bench-in-process")
    await engine.start()
    service = Service({**settings, "model_dir": str(model.directory)})
    service4 = Service({**settings, "precision": "int4"})  # the INT4 build, for the INT4 comparison
    rounds: dict[str, list[Any]] = {k: [] for k in ("engine", "grpc", "grpc_int4", "llama", "llama_int8", "genai",
                                                     "genai_int4", "engine16", "grpc16", "grpc16_int4",
                                                     "engine_pairs", "grpc_pairs")}
    try:
        async with grpc.aio.insecure_channel(service.address) as channel, \
                grpc.aio.insecure_channel(service4.address) as channel4:
            stub = pb2_grpc.InferenceServiceStub(channel)
            local, remote = engine_stream(engine), grpc_stream(stub)
            remote4 = grpc_stream(pb2_grpc.InferenceServiceStub(channel4))
            for warm in (local, remote, remote4):  # the same 4-token warm-up every anchor process gets
                await warm(prompt, 4)
            for round_no in range(1 if quick else ROUNDS):
                print(f"round {round_no + 1}/{ROUNDS}", file=sys.stderr, flush=True)
                rounds["engine"].append(await single(local, prompt))
                rounds["grpc"].append(await single(remote, prompt))
                rounds["grpc_int4"].append(await single(remote4, prompt))
                rounds["llama"].append(run_isolated("llama", gguf, ids, NEW_TOKENS, threads))
                rounds["llama_int8"].append(run_isolated("llama", int8_gguf, ids, NEW_TOKENS, threads) if int8_gguf
                                            else {"error": "llama.cpp could not build the Q8_0 model"})
                rounds["genai"].append(run_isolated("genai", gguf, ids, NEW_TOKENS, threads, 16, sixteen))
                rounds["genai_int4"].append(run_isolated("genai-int4", gguf, ids, NEW_TOKENS, threads, 16, sixteen))
                rounds["engine16"].append(await aggregate(local, many[:16]))
                rounds["grpc16"].append(await aggregate(remote, many[:16]))
                rounds["grpc16_int4"].append(await aggregate(remote4, many[:16]))
            if quick:
                return {"rounds": rounds}
            for pair_no in range(EXTRA_PAIRS):
                if pair_no % 2:
                    grpc_run = await single(remote, prompt)
                    engine_run = await single(local, prompt)
                else:
                    engine_run = await single(local, prompt)
                    grpc_run = await single(remote, prompt)
                rounds["engine_pairs"].append(engine_run)
                rounds["grpc_pairs"].append(grpc_run)
            sweep = await stream_sweep(local, remote, many, rounds)
            long_prompts = [prompt_of(model, RSS_PROMPT, salt) for salt in range(RSS_STREAMS)]
            idle_rss = service.rss_mb()
            watcher = asyncio.create_task(watch_peak_rss(service, stub, RSS_STREAMS))
            await asyncio.gather(*(remote(p, RSS_NEW) for p in long_prompts))
            peak_rss = await asyncio.wait_for(watcher, 30)
    finally:
        await engine.stop()
        service.stop()
        service4.stop()
    return {"rounds": rounds, "sweep": sweep, "idle_rss_mb": idle_rss, "rss_mb_32x512": peak_rss,
            "settings": settings, "kv_rss": await kv_rss(model, threads),
            "chat": await chat_bench(model, Service, {"model_dir": str(model.directory), "intra_op_threads": threads})}


def new_token_counts(rounds: dict[str, list[Any]]) -> dict[str, Any]:
    """The new tokens each batch-1 runner decoded per request, and whether all decoded NEW_TOKENS (this
    engine stops at EOS, the anchors are held to NEW_TOKENS: a shorter count of ours says so here)."""
    seen: dict[str, list[int]] = {}
    for runner in ("engine", "grpc", "grpc_int4"):
        seen[runner] = sorted({r["tokens"] for r in rounds[runner]})
    for runner in ("llama", "llama_int8", "genai", "genai_int4"):
        seen[runner] = sorted({n for r in rounds[runner] for n in r.get("new_tokens_per_row", [])})
    return {"value": seen, "unit": "new tokens per request, by runner", "expected": NEW_TOKENS,
            "all_equal": all(counts == [NEW_TOKENS] for counts in seen.values())}


def med(items: list[dict[str, Any]], key: str) -> float | None:
    values = [item[key] for item in items if key in item]
    return statistics.median(values) if values else None


def anchor_summary(items: list[dict[str, Any]]) -> dict[str, Any]:
    errors = [item["error"] for item in items if "error" in item]
    if errors:
        return {"error": errors[0]}
    summary = {k: v for k, v in items[0].items() if not isinstance(v, float)}
    for key in items[0]:
        if isinstance(items[0][key], float):
            summary[key] = med(items, key)
    summary["rounds"] = len(items)
    return summary


def best_of(rounds: dict[str, list[Any]]) -> dict[str, Any]:
    """The best round of each runner (the least disturbed by other work on the machine)."""
    best: dict[str, Any] = {}
    for runner, items in rounds.items():
        if items and isinstance(items[0], float):
            best[runner] = {"aggregate_tok_s": max(items)}
            continue
        good = [item for item in items if "error" not in item]
        fields = {k for item in good for k, v in item.items() if isinstance(v, float)}
        best[runner] = {k: (min if k.startswith("ttft") else max)(item[k] for item in good) for k in sorted(fields)}
    return best


def target(name: str, measured: float | None, goal: float, better: str, anchor: str) -> dict[str, Any]:
    return {"name": name, "measured": measured, "target": goal, "better": better, "anchor": anchor}


def paired(ours: list[float], anchor: list[Any], key: str) -> float | None:
    """Median over rounds of ours / anchor within the same round (back-to-back runs see the same
    machine load, so the ratio is steadier than a ratio of medians)."""
    pairs = [a / b[key] if isinstance(b, dict) else a / b for a, b in zip(ours, anchor, strict=True)
             if (b.get(key) if isinstance(b, dict) else b)]
    return statistics.median(pairs) if pairs else None


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def machine(model: LoadedModel, load: tuple[float, ...]) -> dict[str, Any]:
    return {"cpus": os.cpu_count(), "python": platform.python_version(), "onnxruntime": onnxruntime.__version__,
            "provider": model.provider, "model": f"{model.manifest.name}/{model.manifest.version}",
            "load_average_at_start": [round(x, 2) for x in load],
            "load_average_at_end": [round(x, 2) for x in os.getloadavg()]}


def main_kv_rss(model: LoadedModel, threads: int) -> None:
    """`--only kv-rss`: just that figure, into its own file (inference.json keeps the full run)."""
    load = os.getloadavg()
    on, on_goal = kv_rss_entries(asyncio.run(kv_rss(model, threads)))
    off, off_goal = kv_rss_entries(asyncio.run(kv_rss(model, threads, prefix_cache=False)))
    document = {"machine": machine(model, load),
                "settings": {"threads": threads, "service": "default settings; then the same with prefix_cache off"},
                "results": {"service_rss_kv_long_beside_short": on, "service_rss_kv_long_beside_short_no_prefix_cache": off},
                "targets": [on_goal, off_goal]}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "inference-kv-rss.json").write_text(json.dumps(document, indent=2) + "\n")
    print(json.dumps(document, indent=2))


def main_chat(model: LoadedModel, threads: int, quick: bool = False) -> None:
    """`--only chat`: the chat figures only, into their own file (`--quick`: 3 turns, 1 conversation,
    into the temp folder: a smoke test, not a result)."""
    load = os.getloadavg()
    settings = {"model_dir": str(model.directory), "intra_op_threads": threads}
    shape = {"turns": 3, "repeats": 1} if quick else {}
    results, targets = chat_entries(asyncio.run(chat_bench(model, Service, settings, **shape)))
    document = {"machine": machine(model, load), "settings": {"threads": threads, "service": "default settings",
                                                              "greedy": True, "quick": quick},
                "results": results, "targets": targets}
    folder = Path(tempfile.gettempdir()) if quick else RESULTS
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "inference-chat.json").write_text(json.dumps(document, indent=2) + "\n")
    print(json.dumps(document, indent=2))


def main_quality(model: LoadedModel, threads: int) -> None:
    """`--only quality`: perplexity of both builds and of onnxruntime-genai's, into their own file."""
    load = os.getloadavg()
    measured = quality(Path(model.manifest.source.path), threads)
    results, targets = quality_entries(measured)
    document = {"machine": machine(model, load),
                "settings": {"threads": threads, "text": "tests/data/prose.txt", "tokens": measured["tokens"],
                             "pass": "teacher-forced, one token at a time through the KV-cache, CPU"},
                "results": results, "targets": targets}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "inference-quality.json").write_text(json.dumps(document, indent=2) + "\n")
    print(json.dumps(document, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=["kv-rss", "chat", "quality"], help="measure one group of figures only")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke test written to the temp folder: one round of ours and the anchors; with "
                             "--only chat, 3 turns of 1 conversation")
    args = parser.parse_args()
    threads = int(os.environ.get("BENCH_THREADS", "0")) or default_threads()
    config = InferenceConfig(server=ServerSettings(port=0), intra_op_threads=threads)
    model = load_model(None, config.session)
    if args.only == "kv-rss":
        main_kv_rss(model, threads)
        return
    if args.only == "chat":
        main_chat(model, threads, args.quick)
        return
    if args.only == "quality":
        main_quality(model, threads)
        return
    if args.quick:
        rounds = asyncio.run(bench(model, threads, quick=True))["rounds"]
        summary = {"rounds": {k: v for k, v in rounds.items() if v}, "new_tokens_per_row": new_token_counts(rounds),
                   "quick": True}
        (Path(tempfile.gettempdir()) / "inference-quick.json").write_text(json.dumps(summary, indent=2) + "\n")
        print(json.dumps(summary, indent=2))
        return
    load = os.getloadavg()
    out = asyncio.run(bench(model, threads))
    rounds, sweep = out["rounds"], out["sweep"]
    llama, genai = anchor_summary(rounds["llama"]), anchor_summary(rounds["genai"])
    llama_int8 = anchor_summary(rounds["llama_int8"])
    engine_ttft, grpc_ttft = med(rounds["engine"], "ttft_ms"), med(rounds["grpc"], "ttft_ms")
    engine_b1, grpc_b1 = med(rounds["engine"], "decode_tok_s"), med(rounds["grpc"], "decode_tok_s")
    grpc16 = sweep["grpc"][16]
    why_llama = llama.get("error", "llama.cpp (llama-cpp-python, same GGUF, same threads), same run")
    if llama.get("extra_buffer_types") == "off":
        why_llama += ("; its AMX/repacked weight buffers crashed (signal) on this CPU, so it ran with plain "
                      "CPU buffers")
    int8_ratio = paired([r["decode_tok_s"] for r in rounds["grpc"]], rounds["llama_int8"], "batch1_decode_tok_s")
    if int8_ratio is not None:
        why_llama += (f"; llama.cpp on the same weights at 8 bits (requantized to Q8_0, the precision this engine "
                      f"runs) decoded {llama_int8['batch1_decode_tok_s']:.1f} tok/s: ours / that = {int8_ratio:.2f}")
    genai4 = anchor_summary(rounds["genai_int4"])
    why_genai = genai.get("error", "onnxruntime-genai Generator on its builder's INT8 model (block 32, accuracy "
                                   f"level 4), {threads} intra-op threads in its config, same run")
    why_genai4 = genai4.get("error", "onnxruntime-genai on its builder's INT4 model (block 32, accuracy level 4, "
                                     "zero points) against this engine's INT4 build, same run")
    ours_b1 = [r["decode_tok_s"] for r in rounds["grpc"]]
    ours4_b1 = [r["decode_tok_s"] for r in rounds["grpc_int4"]]
    counts = new_token_counts(rounds)
    targets = [
        target("batch-1 decode (gRPC) / llama.cpp", paired(ours_b1, rounds["llama"], "batch1_decode_tok_s"), 1.3,
               "higher", why_llama),
        target("batch-1 decode INT8 (gRPC) / llama.cpp Q8_0", int8_ratio, 1.3, "higher",
               llama_int8.get("error", "llama.cpp on the GGUF requantized to Q8_0 by its own quantizer, same run")),
        target("batch-1 decode INT4 (gRPC) / onnxruntime-genai INT4",
               paired(ours4_b1, rounds["genai_int4"], "batch1_decode_tok_s"), 1.0, "higher", why_genai4),
        target("16-stream aggregate INT4 through gRPC / onnxruntime-genai INT4 batch 16",
               paired(rounds["grpc16_int4"], rounds["genai_int4"], "batch16_aggregate_tok_s"), 1.2, "higher",
               why_genai4),
        target("batch-1 decode (gRPC) / onnxruntime-genai", paired(ours_b1, rounds["genai"], "batch1_decode_tok_s"),
               1.0, "higher", why_genai),
        target("16-stream aggregate through gRPC / onnxruntime-genai batch 16",
               paired(rounds["grpc16"], rounds["genai"], "batch16_aggregate_tok_s"), 1.2, "higher", why_genai),
        target("TTFT (gRPC) / llama.cpp TTFT", paired([r["ttft_ms"] for r in rounds["grpc"]], rounds["llama"], "ttft_ms"),
               0.5, "lower", why_llama),
        target("gRPC 1 stream / engine in-process (batch-1 decode)",
               paired(ours_b1 + [r["decode_tok_s"] for r in rounds["grpc_pairs"]],
                      rounds["engine"] + rounds["engine_pairs"], "decode_tok_s"),
               0.95, "higher", f"the same engine in-process, same run ({ROUNDS + EXTRA_PAIRS} back-to-back pairs)"),
        target("RSS MB of the service with 32 active sequences of 512 tokens", out["rss_mb_32x512"], 1536, "lower",
               "absolute"),
    ]
    kv_result, kv_target = kv_rss_entries(out["kv_rss"])
    targets.append(kv_target)
    chat_results, chat_targets = chat_entries(out["chat"])
    targets += chat_targets
    ratios_of_medians = {
        "batch1_grpc_over_llama_cpp": ratio(grpc_b1, llama.get("batch1_decode_tok_s")),
        "batch1_grpc_over_llama_cpp_q8_0": ratio(grpc_b1, llama_int8.get("batch1_decode_tok_s")),
        "batch1_grpc_over_genai": ratio(grpc_b1, genai.get("batch1_decode_tok_s")),
        "grpc16_over_genai16": ratio(grpc16, genai.get("batch16_aggregate_tok_s")),
        "ttft_grpc_over_llama_cpp": ratio(grpc_ttft, llama.get("ttft_ms")),
        "grpc_over_engine_batch1": ratio(grpc_b1, engine_b1),
    }
    results = {
        "engine_ttft_ms": {"value": engine_ttft, "unit": "ms", "prompt_tokens": PROMPT_TOKENS},
        "grpc_ttft_ms": {"value": grpc_ttft, "unit": "ms", "prompt_tokens": PROMPT_TOKENS},
        "engine_batch1_decode": {"value": engine_b1, "unit": "tokens/s"},
        "grpc_batch1_decode": {"value": grpc_b1, "unit": "tokens/s"},
        "engine_aggregate": {"value": sweep["engine"], "unit": "tokens/s by concurrent streams (prefill included)"},
        "grpc_aggregate": {"value": sweep["grpc"], "unit": "tokens/s by concurrent streams (prefill included)"},
        "service_rss_idle": {"value": out["idle_rss_mb"], "unit": "MB"},
        "service_rss_32x512": {"value": out["rss_mb_32x512"], "unit": "MB"},
        "service_rss_kv_long_beside_short": kv_result,
        "kv_bytes_per_token": {"value": model.spec.bytes_per_token, "unit": "bytes"},
        "llama_cpp": {**llama, "unit": "ttft_ms: ms, *_tok_s: tokens/s"},
        "llama_cpp_q8_0": {**llama_int8, "unit": "ttft_ms: ms, *_tok_s: tokens/s",
                           "model": "the same GGUF requantized to Q8_0 by llama.cpp (8-bit, as this engine's INT8)"},
        "batch1_grpc_over_llama_cpp_q8_0_paired": {
            "value": paired(ours_b1, rounds["llama_int8"], "batch1_decode_tok_s"), "unit": "ratio (median over rounds)"},
        "onnxruntime_genai": {**genai, "unit": "ttft_ms: ms, *_tok_s: tokens/s"},
        "onnxruntime_genai_int4": {**genai4, "unit": "ttft_ms: ms, *_tok_s: tokens/s"},
        "grpc_int4_ttft_ms": {"value": med(rounds["grpc_int4"], "ttft_ms"), "unit": "ms", "prompt_tokens": PROMPT_TOKENS},
        "grpc_int4_batch1_decode": {"value": med(rounds["grpc_int4"], "decode_tok_s"), "unit": "tokens/s"},
        "grpc_int4_aggregate16": {"value": statistics.median(rounds["grpc16_int4"]),
                                  "unit": "tokens/s, 16 streams, the same 16 distinct prompts as genai's batch"},
        "new_tokens_per_row": counts,
        "ratios_of_medians": {"value": ratios_of_medians, "unit": "ratio"},
        "best_of_rounds": best_of(rounds),
        "rounds": rounds,
        "issue_reference_figures": ISSUE_TABLE,
        **chat_results,
    }
    document = {
        "machine": machine(model, load),
        "settings": {"ratios": "targets: median over rounds of the ratio within a round; results.ratios_of_medians "
                               "gives ratios of the medians",
                     "prompt_tokens": PROMPT_TOKENS, "new_tokens": NEW_TOKENS, "rounds": ROUNDS, "greedy": True,
                     "threads": threads, "service": out["settings"]},
        "results": results, "targets": targets}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "inference.json").write_text(json.dumps(document, indent=2) + "\n")
    plot(document, RESULTS / "inference.png")
    print(json.dumps({"results": {k: v for k, v in results.items() if k != "rounds"}, "targets": targets}, indent=2))


def plot(document: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = document["results"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for key, label in (("engine_aggregate", "engine in-process"), ("grpc_aggregate", "gRPC service")):
        series = results[key]["value"]
        left.plot([int(n) for n in series], list(series.values()), marker="o", label=label)
    genai16 = results["onnxruntime_genai"].get("batch16_aggregate_tok_s")
    if genai16:
        left.axhline(genai16, color="grey", linestyle="--", label="onnxruntime-genai batch 16")
    left.set_xlabel("concurrent streams")
    left.set_ylabel("aggregate tokens/s")
    left.set_title("Aggregate throughput (CPU, greedy, 128 new tokens)")
    left.legend()
    names = ["engine", "gRPC", "llama.cpp\nQ4_1", "llama.cpp\nQ8_0", "ort-genai"]
    anchors = [results["llama_cpp"], results["llama_cpp_q8_0"], results["onnxruntime_genai"]]
    decode = [results["engine_batch1_decode"]["value"], results["grpc_batch1_decode"]["value"],
              *[anchor.get("batch1_decode_tok_s") or 0 for anchor in anchors]]
    ttft = [results["engine_ttft_ms"]["value"], results["grpc_ttft_ms"]["value"],
            *[anchor.get("ttft_ms") or 0 for anchor in anchors]]
    xs = range(len(names))
    right.bar([x - 0.2 for x in xs], decode, width=0.4, label="batch-1 decode tokens/s")
    right.bar([x + 0.2 for x in xs], ttft, width=0.4, label=f"TTFT ms ({PROMPT_TOKENS}-token prompt)")
    right.set_xticks(list(xs), names)
    right.set_title("Batch 1, same run")
    right.legend()
    fig.tight_layout()
    fig.savefig(path)


if __name__ == "__main__":
    main()
