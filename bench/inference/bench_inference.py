"""`make bench-inference`: TTFT, batch-1 decode, aggregate tokens/s at 1/4/8/16/32 streams (engine
in-process and through the gRPC service), RSS with 32 active sequences of 512 tokens, and the
llama.cpp anchor on the same GGUF in the same run. Writes bench/results/inference.{json,png}."""

from __future__ import annotations

import asyncio
import json
import os
import platform
import statistics
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc

from autoglm.common.v1 import generation_pb2
from autoglm.inference.v1 import inference_service_pb2 as pb2
from autoglm.inference.v1 import inference_service_pb2_grpc as pb2_grpc
from services.common.config import ServerSettings
from services.inference.config import InferenceConfig
from services.inference.engine.engine import Engine
from services.inference.engine.model import LoadedModel, load_model
from services.inference.engine.types import GenerationRequest, SamplingRequest
from services.inference.server import build_server

RESULTS = Path(__file__).resolve().parents[1] / "results"
STREAMS = (1, 4, 8, 16, 32)
NEW_TOKENS = 128
AGG_TOKENS = 48
SENTENCE = "The history of the river valley shows how farmers, traders and builders shaped the land. "
ISSUE_TABLE = {"llama.cpp": {"ttft_ms": 250, "batch1_tok_s": 150},
               "onnxruntime-genai": {"ttft_ms": 79, "batch1_tok_s": 166, "batch16_tok_s": 648}}


def prompt_of(model: LoadedModel, tokens: int, salt: int = 0) -> str:
    text = f"Story {salt}. "
    while len(model.encode(text)) < tokens:
        text += SENTENCE
    ids = model.encode(text)[:tokens]
    return model.decode(ids)


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def engine_stream(engine: Engine, prompt: str, max_tokens: int) -> tuple[float, float, int]:
    """(seconds to first token, seconds total, tokens)."""
    start = time.perf_counter()
    first = 0.0
    tokens = 0
    request = GenerationRequest(prompt=prompt, sampling=SamplingRequest(max_tokens=max_tokens))
    async for delta in engine.generate(request):
        if not first:
            first = time.perf_counter() - start
        tokens += len(delta.token_ids)
    return first, time.perf_counter() - start, tokens


async def grpc_stream(stub: pb2_grpc.InferenceServiceStub, prompt: str, max_tokens: int) -> tuple[float, float, int]:
    start = time.perf_counter()
    first = 0.0
    tokens = 0
    req = pb2.GenerateRequest(prompt=prompt, sampling=generation_pb2.SamplingParams(max_tokens=max_tokens))
    async for message in stub.Generate(req, timeout=600):
        if not first:
            first = time.perf_counter() - start
        tokens += len(message.token_ids)
    return first, time.perf_counter() - start, tokens


async def aggregate(run: Any, prompts: list[str], max_tokens: int) -> float:
    start = time.perf_counter()
    results = await asyncio.gather(*(run(p, max_tokens) for p in prompts))
    return sum(r[2] for r in results) / (time.perf_counter() - start)


async def bench_ours(model: LoadedModel, config: InferenceConfig) -> dict[str, Any]:
    out: dict[str, Any] = {}
    engine = Engine(model, replace(config, max_batch_size=32, decode_rows=16).scheduler)
    await engine.start()
    prompt100 = prompt_of(model, 100)
    run = lambda p, n: engine_stream(engine, p, n)  # noqa: E731
    await run(prompt100, 4)  # warm-up
    ttfts, decodes = [], []
    for _ in range(3):
        first, total, tokens = await run(prompt100, NEW_TOKENS)
        ttfts.append(first)
        decodes.append((tokens - 1) / (total - first))
    out["engine_ttft_ms"] = statistics.median(ttfts) * 1000
    out["engine_batch1_decode_tok_s"] = statistics.median(decodes)
    out["engine_aggregate_tok_s"] = {n: await aggregate(run, [prompt_of(model, 100, i) for i in range(n)], AGG_TOKENS)
                                     for n in STREAMS}
    await engine.stop()

    running = await build_server(replace(config, max_batch_size=32), model)
    try:
        async with grpc.aio.insecure_channel(running.address) as channel:
            stub = pb2_grpc.InferenceServiceStub(channel)
            grun = lambda p, n: grpc_stream(stub, p, n)  # noqa: E731
            await grun(prompt100, 4)
            ttfts, decodes = [], []
            for _ in range(3):
                first, total, tokens = await grun(prompt100, NEW_TOKENS)
                ttfts.append(first)
                decodes.append((tokens - 1) / (total - first))
            out["grpc_ttft_ms"] = statistics.median(ttfts) * 1000
            out["grpc_batch1_decode_tok_s"] = statistics.median(decodes)
            out["grpc_aggregate_tok_s"] = {
                n: await aggregate(grun, [prompt_of(model, 100, i) for i in range(n)], AGG_TOKENS) for n in STREAMS}
    finally:
        await running.stop(0)

    engine = Engine(model, replace(config, max_batch_size=32, decode_rows=16).scheduler)
    await engine.start()
    peak = rss_mb()
    long_prompts = [prompt_of(model, 500, i) for i in range(32)]
    tasks = [asyncio.create_task(engine_stream(engine, p, 12)) for p in long_prompts]
    while not all(t.done() for t in tasks):
        report = engine.load_report()
        if report.active_sequences == 32:
            peak = max(peak, rss_mb())
        await asyncio.sleep(0.05)
    out["rss_mb_32x512"] = peak
    out["kv_bytes_per_token"] = model.spec.bytes_per_token
    await engine.stop()
    return out


def bench_llama_cpp(gguf: Path, prompt: str) -> dict[str, Any]:
    try:
        from llama_cpp import Llama
    except ImportError as err:
        return {"error": f"llama-cpp-python not installed ({err}); `make bench-inference` installs the bench extra"}
    llm = Llama(model_path=str(gguf), n_ctx=1024, n_threads=os.cpu_count() or 2, verbose=False)
    tokens = llm.tokenize(prompt.encode())
    llm(prompt, max_tokens=4)
    ttfts, decodes = [], []
    for _ in range(3):
        llm.reset()
        start = time.perf_counter()
        first = 0.0
        count = 0
        for _chunk in llm(prompt, max_tokens=NEW_TOKENS, temperature=0.0, stream=True):
            if not first:
                first = time.perf_counter() - start
            count += 1
        ttfts.append(first)
        decodes.append((count - 1) / (time.perf_counter() - start - first))
    return {"prompt_tokens": len(tokens), "ttft_ms": statistics.median(ttfts) * 1000,
            "batch1_decode_tok_s": statistics.median(decodes)}


def target(name: str, measured: float | None, goal: float, better: str, anchor: str) -> dict[str, Any]:
    return {"name": name, "measured": measured, "target": goal, "better": better, "anchor": anchor}


def main() -> None:
    config = InferenceConfig(server=ServerSettings(port=0))
    model = load_model(None, config.session)
    ours = asyncio.run(bench_ours(model, config))
    llama = bench_llama_cpp(Path(model.manifest.source.path), prompt_of(model, 100))
    genai = {"error": "onnxruntime-genai is not installed here: its builder needs a Hugging Face folder with "
                      "config.json (this machine has no hub access) and was not built in this run"}
    ratio = lambda a, b: (a / b) if a and b else None  # noqa: E731
    targets = [
        target("batch-1 decode / llama.cpp", ratio(ours["grpc_batch1_decode_tok_s"], llama.get("batch1_decode_tok_s")),
               1.3, "higher", "llama.cpp (llama-cpp-python) on the same GGUF, same run"),
        target("batch-1 decode / onnxruntime-genai", None, 1.0, "higher", "onnxruntime-genai: " + genai["error"]),
        target("16-stream aggregate gRPC / onnxruntime-genai batch 16", None, 1.0, "higher",
               "onnxruntime-genai: " + genai["error"]),
        target("TTFT / llama.cpp TTFT", ratio(ours["grpc_ttft_ms"], llama.get("ttft_ms")), 0.5, "lower",
               "llama.cpp (llama-cpp-python) on the same GGUF, same run"),
        target("gRPC 1 stream / engine in-process", ratio(ours["grpc_aggregate_tok_s"][1],
                                                          ours["engine_aggregate_tok_s"][1]),
               0.95, "higher", "the same engine in-process, same run"),
        target("RSS MB with 32 active sequences of 512 tokens", ours["rss_mb_32x512"], 1536, "lower", "absolute"),
    ]
    results = {
        "engine_ttft_ms": {"value": ours["engine_ttft_ms"], "unit": "ms", "prompt_tokens": 100},
        "grpc_ttft_ms": {"value": ours["grpc_ttft_ms"], "unit": "ms", "prompt_tokens": 100},
        "engine_batch1_decode": {"value": ours["engine_batch1_decode_tok_s"], "unit": "tokens/s"},
        "grpc_batch1_decode": {"value": ours["grpc_batch1_decode_tok_s"], "unit": "tokens/s"},
        "engine_aggregate": {"value": ours["engine_aggregate_tok_s"], "unit": "tokens/s by concurrent streams"},
        "grpc_aggregate": {"value": ours["grpc_aggregate_tok_s"], "unit": "tokens/s by concurrent streams"},
        "rss_32x512": {"value": ours["rss_mb_32x512"], "unit": "MB"},
        "kv_bytes_per_token": {"value": ours["kv_bytes_per_token"], "unit": "bytes"},
        "llama_cpp": llama, "onnxruntime_genai": genai,
        "issue_reference_figures": ISSUE_TABLE,
    }
    document = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                            "provider": model.provider, "model": f"{model.manifest.name}/{model.manifest.version}"},
                "settings": {"new_tokens": NEW_TOKENS, "aggregate_new_tokens": AGG_TOKENS},
                "results": results, "targets": targets}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "inference.json").write_text(json.dumps(document, indent=2) + "\n")
    plot(ours, RESULTS / "inference.png")
    print(json.dumps(document, indent=2))


def plot(ours: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for key, label in (("engine_aggregate_tok_s", "engine in-process"), ("grpc_aggregate_tok_s", "gRPC service")):
        ax.plot(list(ours[key]), list(ours[key].values()), marker="o", label=label)
    ax.set_xlabel("concurrent streams")
    ax.set_ylabel("aggregate tokens/s")
    ax.set_title("Inference aggregate throughput (CPU)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)


if __name__ == "__main__":
    main()
