"""What each build compared in `make bench-inference` computes, beside how fast (`--only quality`, into
bench/results/inference-quality.json): perplexity and top-1 agreement with the float32 reference on
tests/data/prose.txt, the text and gates of the model build's tests (tests/data/golden.json: the float32
graph of the GGUF's de-quantized weights, perplexity within 10 %, top-1 agreement at least 0.95), for
this engine's INT8 and INT4 builds and for onnxruntime-genai's INT8 and INT4 builds of the same GGUF
(bench/inference/anchors.py `genai_model`, the builder options recorded). Every model runs the same
teacher-forced pass, one token at a time through its KV-cache, on the CPU with the same threads.

A speed ratio between two builds means something only where both compute the same model: an INT4
build whose perplexity is far above the reference is faster for computing something else.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

from bench.inference.anchors import GENAI_BUILD_OPTIONS, bench_cache, genai_model
from services.inference.modelbuild.build import build
from services.inference.modelbuild.ort_runner import PAST_PREFIX, PRESENT_PREFIX, OnnxCausalLM, session_options

DATA = Path(__file__).resolve().parents[2] / "tests" / "data"


def _genai_lm(folder: Path, threads: int) -> OnnxCausalLM:
    """onnxruntime-genai's graph through the same runner (its inputs name the cache as ours do; its
    head size is a symbolic dimension, so the shape comes from its config)."""
    config = json.loads((folder / "genai_config.json").read_text())["model"]["decoder"]
    lm = OnnxCausalLM.__new__(OnnxCausalLM)
    lm.session = ort.InferenceSession(str(folder / "model.onnx"), session_options(threads),
                                      providers=["CPUExecutionProvider"])
    lm.past_names = [i.name for i in lm.session.get_inputs() if i.name.startswith(PAST_PREFIX)]
    lm.present_names = [name.replace(PAST_PREFIX, PRESENT_PREFIX) for name in lm.past_names]
    lm.kv_heads, lm.head_dim = int(config["num_key_value_heads"]), int(config["head_size"])
    lm.output_names = ["logits", *lm.present_names]
    return lm


def quality(gguf: Path, threads: int) -> dict[str, Any]:
    golden = json.loads((DATA / "golden.json").read_text(encoding="utf-8"))["prose"]
    reference_top1 = np.array(golden["fp32_top1"])
    models: dict[str, tuple[Path, OnnxCausalLM]] = {}
    for precision in ("int8", "int4"):
        path = build(precision=precision).path
        models[f"engine_{precision}"] = (path, OnnxCausalLM(path / "model.onnx", session_options(threads)))
    for precision in ("int8", "int4"):
        folder = genai_model(gguf, bench_cache(), precision)
        models[f"genai_{precision}"] = (folder, _genai_lm(folder, threads))
    tokenizer = Tokenizer.from_file(str(models["engine_int8"][0] / "tokenizer.json"))
    ids = tokenizer.encode((DATA / "prose.txt").read_text(encoding="utf-8")).ids
    assert len(ids) == golden["tokens"], (len(ids), golden["tokens"])
    limit = golden["fp32_perplexity"] * (1 + golden["max_relative_increase"])
    out: dict[str, Any] = {}
    for name, (path, lm) in models.items():
        perplexity, top1 = lm.score(list(ids))
        agreement = float(np.mean(np.array(top1) == reference_top1))
        out[name] = {"perplexity": perplexity, "top1_agreement": agreement, "model": str(path),
                     "passes_the_build_gates": bool(perplexity <= limit and agreement >= golden["min_top1_agreement"])}
        if name.startswith("genai"):
            out[name]["builder_options"] = GENAI_BUILD_OPTIONS[name.removeprefix("genai_")]
    return {"models": out, "tokens": len(ids), "fp32_perplexity": golden["fp32_perplexity"],
            "perplexity_limit": limit, "min_top1_agreement": golden["min_top1_agreement"], "threads": threads}


def quality_entries(measured: dict[str, Any]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    models = measured["models"]
    results: dict[str, Any] = {
        f"{name}_perplexity": {"value": m["perplexity"], "unit": "perplexity on tests/data/prose.txt",
                               "top1_agreement": m["top1_agreement"], "passes_the_build_gates": m["passes_the_build_gates"],
                               **{k: v for k, v in m.items() if k in ("model", "builder_options")}}
        for name, m in models.items()}
    reference = measured["fp32_perplexity"]
    results["fp32_reference_perplexity"] = {"value": reference, "unit": "perplexity (tests/data/golden.json)"}
    targets = [
        {"name": f"{label} perplexity / float32 reference", "measured": models[name]["perplexity"] / reference,
         "target": measured["perplexity_limit"] / reference, "better": "lower",
         "anchor": f"the float32 graph of the GGUF's weights, {reference:.3f} on the same {measured['tokens']} tokens"}
        for name, label in (("engine_int8", "this engine's INT8"), ("engine_int4", "this engine's INT4"),
                            ("genai_int8", "onnxruntime-genai INT8"), ("genai_int4", "onnxruntime-genai INT4"))]
    return results, targets
