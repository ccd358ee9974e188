"""build_model(): source -> fp32 ONNX -> INT8 weight-only ONNX -> verified cache entry."""

from __future__ import annotations

import platform
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

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
from services.inference.modelbuild.quantize import QuantConfig

log = structlog.get_logger(__name__)

# Bump when the graph, quantization or file layout changes: it is part of the cache path.
RECIPE = "int8-sq-gqa-b32-v4"
MODEL_FILE = "model.onnx"
# accuracy_level 4: int8 activations per row and block (the fast CPU kernel; per-row, so rows of
# a batch stay independent). Smoothing (alpha) keeps that activation rounding small.
QUANT = QuantConfig(bits=8, block_size=32, symmetric=True, accuracy_level=4)
SMOOTHING_ALPHA = 0.5
SESSION_DEFAULTS = {"intra_op_num_threads": 2, "inter_op_num_threads": 1,
                    "graph_optimization_level": "ORT_ENABLE_ALL"}
VERSIONED_PACKAGES = ("torch", "transformers", "optimum", "onnx", "onnxruntime", "numpy", "tokenizers",
                      "gguf")

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
          progress: Progress = _log_progress) -> BuildResult:
    start = time.perf_counter()
    identity = source.identify(source_spec)
    root = cache.cache_root(cache_dir)
    version = f"{RECIPE}-{identity.sha256[:12]}"
    final = cache.model_dir(root, identity.name, version)
    if not force:
        existing = cache.valid_manifest(final)
        if existing is not None:
            progress(f"reusing cached model {final} (manifest verified)")
            return BuildResult(final, existing, reused=True, seconds=time.perf_counter() - start)

    with cache.staging(final) as staged:
        progress(f"fetch: {identity.origin}")
        resolved = source.resolve(source_spec, cache.downloads_dir(root))
        manifest = _build_into(staged, resolved, identity.name, version, progress)
        progress("verify: re-hashing files and running one forward pass")
        manifest.verify(staged)
        smoke_test(staged, manifest)
        cache.publish(staged, final)
    seconds = time.perf_counter() - start
    progress(f"done: {final} in {seconds:.0f}s")
    return BuildResult(final, manifest, reused=False, seconds=seconds)


def build_model(source: str | None = None, cache_dir: Path | None = None, force: bool = False) -> Path:
    """Build (or reuse) the INT8 model for `source` (None = bundled SmolLM2); returns its dir."""
    return build(source, cache_dir, force).path


def _build_into(out: Path, resolved: source.ModelSource, name: str, version: str,
                progress: Progress) -> Manifest:
    from services.inference.modelbuild.export import load_checkpoint, write_fp32_onnx, write_tokenizer_files
    from services.inference.modelbuild.quantize import quantize_weights
    from services.inference.modelbuild.smoothing import CALIBRATION_TEXTS, collect_input_maxima, smooth

    started = time.perf_counter()
    progress(f"load: {resolved.path} with transformers (float32)")
    checkpoint = load_checkpoint(resolved)
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
    dims = checkpoint.dims
    manifest = Manifest(
        name=name,
        version=version,
        source=SourceInfo(origin=resolved.identity.origin, path=str(resolved.path),
                          sha256=resolved.identity.sha256, kind=resolved.kind),
        precision="int8",
        quantization={**QUANT.describe(), "untied_lm_head": True,
                      "smoothing": {"alpha": SMOOTHING_ALPHA, "calibration_texts": len(CALIBRATION_TEXTS)},
                      "float32": ["embeddings", "norms", "attention", "kv-cache"]},
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
        build={"recipe": RECIPE, "model_type": checkpoint.model_type,
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
