"""build_model(): source -> fp32 ONNX -> INT8 (default) or INT4 weight-only ONNX -> verified cache entry.

INT8: SmoothQuant-folded weights, quantized per block of 32 by ONNX Runtime's quantizer.
INT4: the GGUF's Q4_1 projection blocks carried into 4-bit MatMulNBits as they are (q4_blocks.py);
projections that are not Q4_1 in the source are quantized to 4 bits from float, and the lm_head
(tied to the Q8_0 embedding in the bundled GGUF) is INT8 as in the INT8 build.
"""

from __future__ import annotations

import platform
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from services.inference.modelbuild import cache, source
from services.inference.modelbuild.errors import ModelBuildError
from services.inference.modelbuild.llama_graph import (
    ATTENTION_MASK,
    INPUT_IDS,
    LOGITS,
    ONNX_OPSET,
    PAST_KEY,
    PAST_VALUE,
    PRESENT_KEY,
    PRESENT_VALUE,
    kv_input_names,
    kv_output_names,
)
from services.inference.modelbuild.manifest import KvLayout, Manifest, SourceInfo, TokenIds, hash_files, write_manifest
from services.inference.modelbuild.onnx_io import save_onnx
from services.inference.modelbuild.quantize import QuantConfig

if TYPE_CHECKING:
    from services.inference.modelbuild.export import LoadedCheckpoint

log = structlog.get_logger(__name__)

# Bump when the graph, quantization or file layout changes: it is part of the cache path, and so
# is the precision (each precision has its own recipe), so INT8 and INT4 builds live side by side.
RECIPES = {"int8": "int8-sq-gqa-b32-v4", "int4": "int4-q41-gqa-b32-v1"}
PRECISIONS = tuple(RECIPES)
DEFAULT_PRECISION = "int8"
RECIPE = RECIPES[DEFAULT_PRECISION]
MODEL_FILE = "model.onnx"
# accuracy_level 4: int8 activations per row and block (the fast CPU kernel; per-row, so rows of
# a batch stay independent). Smoothing (alpha) keeps that activation rounding small.
QUANT = QuantConfig(bits=8, block_size=32, symmetric=True, accuracy_level=4)
# INT4 projections: 4 bits with a uint8 zero point per block of 32 (Q4_1's shape), same accuracy level.
QUANT_INT4 = QuantConfig(bits=4, block_size=32, symmetric=False, accuracy_level=4)
SMOOTHING_ALPHA = 0.5
SESSION_DEFAULTS = {"intra_op_num_threads": 2, "inter_op_num_threads": 1,
                    "graph_optimization_level": "ORT_ENABLE_ALL"}
VERSIONED_PACKAGES = ("torch", "transformers", "optimum", "onnx", "onnxruntime", "numpy", "tokenizers",
                      "gguf")

# The graph's fused projection weights and the checkpoint projections they are made of, in order.
FUSED_PROJECTIONS = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "o_proj": ("o_proj",),
                     "gate_up_proj": ("gate_proj", "up_proj"), "down_proj": ("down_proj",)}

Progress = Callable[[str], None]


@dataclass(frozen=True)
class BuildResult:
    path: Path
    manifest: Manifest
    reused: bool
    seconds: float


def _log_progress(message: str) -> None:
    log.info("build.progress", step=message)


def build(source_spec: str | None = None, cache_dir: Path | None = None, force: bool = False,
          progress: Progress = _log_progress, precision: str = DEFAULT_PRECISION) -> BuildResult:
    if precision not in RECIPES:
        raise ModelBuildError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    start = time.perf_counter()
    identity = source.identify(source_spec)
    root = cache.cache_root(cache_dir)
    version = f"{RECIPES[precision]}-{identity.sha256[:12]}"
    final = cache.model_dir(root, identity.name, version)
    if not force:
        existing = cache.valid_manifest(final)
        if existing is not None:
            progress(f"reusing cached model {final} (manifest verified)")
            return BuildResult(final, existing, reused=True, seconds=time.perf_counter() - start)

    with cache.staging(final) as staged:
        progress(f"fetch: {identity.origin}")
        resolved = source.resolve(source_spec, cache.downloads_dir(root))
        manifest = _build_into(staged, resolved, identity.name, version, progress, precision)
        progress("verify: re-hashing files and running one forward pass")
        manifest.verify(staged)
        smoke_test(staged, manifest)
        cache.publish(staged, final)
    seconds = time.perf_counter() - start
    progress(f"done: {final} in {seconds:.0f}s")
    return BuildResult(final, manifest, reused=False, seconds=seconds)


def build_model(source: str | None = None, cache_dir: Path | None = None, force: bool = False,
                precision: str = DEFAULT_PRECISION) -> Path:
    """Build (or reuse) the INT8 (or INT4) model for `source` (None = bundled SmolLM2); returns its dir."""
    return build(source, cache_dir, force, precision=precision).path


def _build_into(out: Path, resolved: source.ModelSource, name: str, version: str,
                progress: Progress, precision: str = DEFAULT_PRECISION) -> Manifest:
    from services.inference.modelbuild.export import load_checkpoint, write_fp32_onnx, write_tokenizer_files
    from services.inference.modelbuild.quantize import quantize_weights
    from services.inference.modelbuild.smoothing import CALIBRATION_TEXTS, collect_input_maxima, smooth

    started = time.perf_counter()
    progress(f"load: {resolved.path} with transformers (float32)")
    checkpoint = load_checkpoint(resolved)
    if precision == "int4":
        files = write_tokenizer_files(checkpoint, out)
        quantization = _write_int4(checkpoint, resolved, out, progress)
        return _finish(out, checkpoint, resolved, name, version, "int4", quantization, files, started)
    progress(f"calibrate: activation ranges on {len(CALIBRATION_TEXTS)} texts, smoothing alpha {SMOOTHING_ALPHA}")
    maxima = collect_input_maxima(checkpoint.model, checkpoint.tokenizer, CALIBRATION_TEXTS)
    smoothed = smooth(checkpoint.weights, checkpoint.dims, maxima, SMOOTHING_ALPHA)
    progress("export: writing the fp32 ONNX decoder with KV-cache")
    fp32_dir = out / "fp32"
    fp32_path = write_fp32_onnx(checkpoint, fp32_dir, smoothed)
    files = write_tokenizer_files(checkpoint, out)
    progress(f"quantize: INT8 MatMulNBits (weights per block of {QUANT.block_size}, accuracy level "
             f"{QUANT.accuracy_level})")
    quantize_weights(fp32_path, out / MODEL_FILE, QUANT)
    shutil.rmtree(fp32_dir)
    quantization = {**QUANT.describe(), "untied_lm_head": True,
                    "smoothing": {"alpha": SMOOTHING_ALPHA, "calibration_texts": len(CALIBRATION_TEXTS)},
                    "float32": ["embeddings", "norms", "attention", "kv-cache"]}
    return _finish(out, checkpoint, resolved, name, version, "int8", quantization, files, started)


def _write_int4(checkpoint: LoadedCheckpoint, resolved: source.ModelSource, out: Path,
                progress: Progress) -> dict[str, Any]:
    """The unsmoothed fp32 graph with its Q4_1 projections mapped, the rest quantized; returns the
    manifest's quantization section."""
    from services.inference.modelbuild.int4_graph import map_q4_weights
    from services.inference.modelbuild.llama_graph import build_llama_graph
    from services.inference.modelbuild.q4_blocks import Q4Blocks, read_projections
    from services.inference.modelbuild.quantize import quantize_model, weight_nodes

    dims = checkpoint.dims
    progress("export: writing the fp32 decoder graph (no smoothing: the GGUF's blocks are kept as they are)")
    model = build_llama_graph(dims, checkpoint.weights)
    blocks: dict[str, Q4Blocks] = {}
    not_q4: list[str] = []
    if resolved.kind == "gguf":
        layers, not_q4 = read_projections(resolved.path, dims)
        for i, layer in enumerate(layers):
            for fused, parts in FUSED_PROJECTIONS.items():
                if all(p in layer for p in parts):
                    blocks[f"layers.{i}.{fused}.weight"] = Q4Blocks.concat([layer[p] for p in parts])
    progress(f"quantize: {len(blocks)} projections mapped from Q4_1 to 4-bit MatMulNBits (block 32, "
             f"accuracy level {QUANT_INT4.accuracy_level})")
    stats = map_q4_weights(model, blocks, QUANT_INT4.accuracy_level or 0)
    projections = {f"layers.{i}.{fused}.weight" for i in range(dims.num_layers) for fused in FUSED_PROJECTIONS}
    requantized = sorted(projections - set(blocks))
    if requantized:
        progress(f"quantize: {len(requantized)} projections not Q4_1 in the source, 4-bit from float")
        model = quantize_model(model, QUANT_INT4, weight_nodes(model, set(requantized)))
    progress(f"quantize: lm_head INT8 (block {QUANT.block_size}, accuracy level {QUANT.accuracy_level})")
    model = quantize_model(model, QUANT, weight_nodes(model, {"lm_head.weight"}))
    save_onnx(model, out / MODEL_FILE)
    return {**QUANT_INT4.describe(), "zero_points": "uint8, one per block",
            "q4_1_mapping": stats.describe(),
            "requantized_from_float": {"tensors": requantized, "gguf_tensors_not_q4_1": not_q4,
                                       **QUANT_INT4.describe()},
            "lm_head": {**QUANT.describe(), "untied_lm_head": True},
            "smoothing": None,
            "float32": ["embeddings", "norms", "attention", "kv-cache", "q4_1 block corrections"]}


def _finish(out: Path, checkpoint: LoadedCheckpoint, resolved: source.ModelSource, name: str, version: str,
            precision: str, quantization: dict[str, Any], files: dict[str, str], started: float) -> Manifest:
    dims = checkpoint.dims
    manifest = Manifest(
        name=name,
        version=version,
        source=SourceInfo(origin=resolved.identity.origin, path=str(resolved.path),
                          sha256=resolved.identity.sha256, kind=resolved.kind),
        precision=precision,
        quantization=quantization,
        opset={"ai.onnx": ONNX_OPSET, "com.microsoft": 1},
        model_file=MODEL_FILE,
        inputs=[INPUT_IDS, ATTENTION_MASK, *kv_input_names(dims.num_layers)],
        outputs=[LOGITS, *kv_output_names(dims.num_layers)],
        logits="float32 [batch, 1, vocab]: each row's last real token only",
        kv=KvLayout(num_layers=dims.num_layers, num_heads=dims.num_heads, num_kv_heads=dims.num_kv_heads,
                    head_dim=dims.head_dim, dtype="float32",
                    shape=["batch", "num_kv_heads", "sequence", "head_dim"],
                    past_key=PAST_KEY, past_value=PAST_VALUE, present_key=PRESENT_KEY,
                    present_value=PRESENT_VALUE, padding="right",
                    attention_mask="row b: ones for its first n_b tokens (past + new), then zeros; "
                                   "first prompt right-padded, later steps the same number of new "
                                   "tokens per row; RoPE positions come from n_b"),
        context_window=dims.max_positions,
        vocab_size=dims.vocab_size,
        tokens=TokenIds(bos=checkpoint.special.bos_id, eos=checkpoint.special.eos_ids,
                        pad=checkpoint.special.pad_id),
        chat_template=checkpoint.chat_template,
        tokenizer_file=files["tokenizer"],
        generation_config_file=files["generation_config"],
        session=SESSION_DEFAULTS,
        versions=package_versions(),
        build={"recipe": RECIPES[precision], "model_type": checkpoint.model_type,
               "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
               "seconds": round(time.perf_counter() - started, 1)},
        files=hash_files(out),
    )
    write_manifest(manifest, out)
    return manifest


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for package in VERSIONED_PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return versions


def smoke_test(model_dir: Path, manifest: Manifest) -> None:
    """The model loads with onnxruntime alone, the tokenizer loads, and one prompt decodes."""
    import numpy as np
    from tokenizers import Tokenizer

    from services.inference.modelbuild.ort_runner import OnnxCausalLM

    tokenizer = Tokenizer.from_file(str(model_dir / manifest.tokenizer_file))
    lm = OnnxCausalLM(model_dir / manifest.model_file)
    ids = tokenizer.encode("<|im_start|>user\nSay hello.<|im_end|>\n<|im_start|>assistant\n").ids
    logits, _, _ = lm.prefill([ids], manifest.tokens.pad)
    if logits.shape != (1, manifest.vocab_size) or not np.isfinite(logits).all():
        raise ModelBuildError(f"smoke test failed: logits shape {logits.shape} or non-finite values")
