"""INT4 against INT8 through gRPC, a short run: batch-1 TTFT and decode tokens/s on the same 108-token
prompt, the two builds served side by side (one process each, same threads) and taking turns round by
round, so load from other work on the machine falls on both alike. Medians of the rounds.

    python -m bench.inference.bench_precision [--rounds 3] [--threads 2]

Builds (or reuses) both models first. Writes bench/results/inference-precision.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
from pathlib import Path
from typing import Any

import grpc

from autoglm.inference.v1 import inference_service_pb2_grpc as pb2_grpc
from bench.inference.bench_inference import NEW_TOKENS, PROMPT_TOKENS, RESULTS, Service, grpc_stream, prompt_ids, single
from services.inference.engine.model import load_model
from services.inference.engine.session import SessionSettings
from services.inference.modelbuild.build import PRECISIONS, build


async def run(dirs: dict[str, Path], rounds: int, threads: int) -> dict[str, Any]:
    model = load_model(dirs["int8"], SessionSettings(provider="cpu", intra_op_threads=1))
    prompt = model.decode(prompt_ids(model, PROMPT_TOKENS))
    services = {p: Service({"model_dir": str(d), "intra_op_threads": threads, "provider": "cpu"})
                for p, d in dirs.items()}
    runs: dict[str, list[dict[str, float]]] = {p: [] for p in dirs}
    try:
        channels = {p: grpc.aio.insecure_channel(s.address) for p, s in services.items()}
        streams = {p: grpc_stream(pb2_grpc.InferenceServiceStub(c)) for p, c in channels.items()}
        for stream in streams.values():  # warm-up alike
            await stream(prompt, 8)
        for round_no in range(rounds):
            order = list(dirs) if round_no % 2 == 0 else list(dirs)[::-1]
            for precision in order:
                runs[precision].append(await single(streams[precision], prompt))
            print(f"round {round_no + 1}/{rounds}: " + ", ".join(
                f"{p} {runs[p][-1]['decode_tok_s']:.1f} tok/s {runs[p][-1]['ttft_ms']:.0f} ms" for p in dirs),
                file=sys.stderr, flush=True)
        for channel in channels.values():
            await channel.close()
    finally:
        for service in services.values():
            service.stop()
    summary = {p: {key: round(statistics.median(r[key] for r in items), 2)
                   for key in ("ttft_ms", "decode_tok_s", "tokens")} for p, items in runs.items()}
    return {"settings": {"prompt_tokens": PROMPT_TOKENS, "max_new_tokens": NEW_TOKENS, "rounds": rounds,
                         "intra_op_threads": threads, "path": "gRPC, one service process per build",
                         "load_average_at_end": os.getloadavg(), "cpus": os.cpu_count()},
            "median": summary,
            "int4_over_int8": {k: round(summary["int4"][k] / summary["int8"][k], 3)
                               for k in ("ttft_ms", "decode_tok_s")},
            "rounds": runs, "models": {p: str(d) for p, d in dirs.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    dirs = {p: build(None, precision=p).path for p in PRECISIONS}
    result = asyncio.run(run(dirs, args.rounds, args.threads))
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "inference-precision.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({"median": result["median"], "int4_over_int8": result["int4_over_int8"]}))


if __name__ == "__main__":
    main()
