"""The real model build: bundled SmolLM2 -> cached INT8 and INT4 ONNX models, each checked against
golden.json by the same gates (perplexity within 10 % of fp32, golden continuations, batch invariance).

Builds each once into the model cache ($AUTOGLM_MODEL_CACHE or ~/.cache/autoglm/models; `make model`
has usually done it already) and reuses it. Every check runs the real model through onnxruntime.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer

from services.inference.chat_template import ChatTemplate
from services.inference.engine.engine import min_decode_rows
from services.inference.modelbuild.build import BuildResult, build
from services.inference.modelbuild.hashing import sha256_file
from services.inference.modelbuild.manifest import MANIFEST_NAME, Manifest, load_manifest
from services.inference.modelbuild.ort_runner import OnnxCausalLM, StaticCacheDecoder, length_mask, past_len
from services.inference.modelbuild.record_golden import chat_ids, prefix_match

DATA = Path(__file__).resolve().parents[1] / "data"
ROOT = Path(__file__).resolve().parents[2]
GOLDEN = json.loads((DATA / "golden.json").read_text(encoding="utf-8"))

BATCH_PROMPTS = [
    "What is the capital of France?",
    "hi",
    "Write a haiku about rain.",
    "Explain, in three short sentences, why bread rises when it is baked in a hot oven.",
    "List three fruits.",
    "What is 12 times 7?",
    "Translate 'good morning' into Spanish.",
    "Give me one tip for sleeping better on a hot night, and say why it works.",
]


@pytest.fixture(scope="module", params=["int8", "int4"])
def built(request: pytest.FixtureRequest) -> BuildResult:
    return build(None, precision=request.param)


@pytest.fixture(scope="module")
def manifest(built: BuildResult) -> Manifest:
    return load_manifest(built.path)


@pytest.fixture(scope="module")
def lm(built: BuildResult, manifest: Manifest) -> OnnxCausalLM:
    # as the engine decodes it (services.inference.engine.engine.min_decode_rows): the INT4 build never one row alone
    return OnnxCausalLM(built.path / manifest.model_file, min_rows=min_decode_rows(manifest.precision))


@pytest.fixture(scope="module")
def tokenizer(built: BuildResult, manifest: Manifest) -> Tokenizer:
    return Tokenizer.from_file(str(built.path / manifest.tokenizer_file))


def chat(tokenizer: Tokenizer, manifest: Manifest, text: str) -> list[int]:
    return chat_ids(ChatTemplate.for_model(manifest, tokenizer), tokenizer, text)


def test_manifest_verifies_and_every_file_hashes(built: BuildResult, manifest: Manifest) -> None:
    manifest.verify(built.path)
    on_disk = {p.relative_to(built.path).as_posix() for p in built.path.rglob("*") if p.is_file()}
    assert on_disk - {MANIFEST_NAME} == set(manifest.files)
    for rel, digest in manifest.files.items():
        assert sha256_file(built.path / rel) == digest, rel
    assert manifest.precision in manifest.version and manifest.version.startswith(manifest.precision)
    assert manifest.source.sha256 == "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
    assert manifest.versions["onnxruntime"] and manifest.versions["torch"] == "2.13.0+cpu"


def test_second_build_reuses_the_cache(built: BuildResult) -> None:
    messages: list[str] = []
    again = build(None, progress=messages.append, precision=built.manifest.precision)
    assert again.reused is True
    assert again.path == built.path
    assert messages == [f"reusing cached model {built.path} (manifest verified)"]


def test_model_dir_serves_without_torch(built: BuildResult) -> None:
    """What the serving engine needs loads with onnxruntime, numpy, tokenizers and jinja2 only."""
    script = (
        "import sys, pathlib\n"
        "from services.inference.modelbuild import load_manifest\n"
        "from services.inference.modelbuild.ort_runner import OnnxCausalLM\n"
        "from tokenizers import Tokenizer\n"
        f"d = pathlib.Path({str(built.path)!r})\n"
        "m = load_manifest(d); m.verify(d)\n"
        "tok = Tokenizer.from_file(str(d / m.tokenizer_file))\n"
        "lm = OnnxCausalLM(d / m.model_file)\n"
        "out = lm.greedy([tok.encode('Hello').ids], 4, m.tokens.pad)\n"
        "assert len(out[0]) == 4\n"
        "heavy = [n for n in ('torch', 'transformers', 'optimum') if n in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True,
                          check=False)
    assert done.returncode == 0, done.stderr[-2000:]


def test_tokenizer_template_and_special_tokens(built: BuildResult, manifest: Manifest,
                                               tokenizer: Tokenizer) -> None:
    assert tokenizer.token_to_id("<|im_end|>") == manifest.tokens.eos[0] == manifest.tokens.pad
    ids = chat(tokenizer, manifest, "Hi")
    assert tokenizer.decode(ids, skip_special_tokens=False).endswith("<|im_start|>assistant\n")
    assert (built.path / "chat_template.jinja").read_text() == manifest.chat_template
    generation = json.loads((built.path / manifest.generation_config_file).read_text())
    assert generation["eos_token_ids"] == manifest.tokens.eos
    assert manifest.inputs[:2] == ["input_ids", "attention_mask"]
    assert manifest.inputs[2:] == manifest.kv.past_names()
    assert manifest.outputs == ["logits", *manifest.kv.present_names()]
    assert (manifest.kv.num_layers, manifest.kv.num_kv_heads, manifest.kv.head_dim) == (30, 3, 64)


def test_int4_build_carries_every_q4_1_block_exactly(built: BuildResult, manifest: Manifest) -> None:
    if manifest.precision != "int4":
        assert manifest.quantization["bits"] == 8 and manifest.quantization["smoothing"]["alpha"] == 0.5
        return
    quantization = manifest.quantization
    assert (quantization["bits"], quantization["block_size"], quantization["symmetric"]) == (4, 32, False)
    mapping = quantization["q4_1_mapping"]
    # 30 layers x (q/k/v, o, gate/up, down); 134,217,728 weights / 32 ... every projection block of the GGUF
    assert mapping["exact"] is True and mapping["max_abs_weight_error"] == 0.0 and mapping["tensors"] == 120
    assert mapping["blocks"] == 3_317_760
    assert mapping["integer_zero_point_blocks"] + mapping["corrected_blocks"] == mapping["blocks"]
    assert quantization["requantized_from_float"]["tensors"] == []
    assert quantization["lm_head"]["bits"] == 8
    int8 = build(None)  # the INT8 build stays beside it
    assert int8.path != built.path and int8.manifest.precision == "int8"
    weights = sum(p.stat().st_size for p in built.path.glob("model.onnx*"))
    int8_weights = sum(p.stat().st_size for p in int8.path.glob("model.onnx*"))
    # the float32 embedding (113 MB) is the same in both; the projections take about half the bytes
    assert weights < 0.9 * int8_weights


def test_perplexity_and_top1_agreement_on_prose(lm: OnnxCausalLM, tokenizer: Tokenizer) -> None:
    prose = GOLDEN["prose"]
    ids = tokenizer.encode((DATA / "prose.txt").read_text(encoding="utf-8")).ids
    assert len(ids) == prose["tokens"]
    perplexity, top1 = lm.score(list(ids))
    assert perplexity <= prose["fp32_perplexity"] * (1 + prose["max_relative_increase"]), perplexity
    agreement = float(np.mean(np.array(top1) == np.array(prose["fp32_top1"])))
    assert agreement >= prose["min_top1_agreement"], agreement


def test_golden_continuations_follow_the_divergence_rule(lm: OnnxCausalLM, manifest: Manifest,
                                                         tokenizer: Tokenizer) -> None:
    rule = GOLDEN["divergence_rule"]
    first_tokens_identical = 0
    for case in GOLDEN["prompts"]:
        assert chat(tokenizer, manifest, case["user"]) == case["prompt_ids"]
        out = lm.greedy([case["prompt_ids"]], GOLDEN["new_tokens"], manifest.tokens.pad,
                        tuple(manifest.tokens.eos))[0]
        same = prefix_match(out, case["fp32_ids"])
        if same < len(case["fp32_ids"]):
            # A divergence may only start where fp32 itself is at a near tie.
            assert case["fp32_margins"][same] < rule["near_tie"], (case["user"], same, out)
        first_tokens_identical += same >= min(rule["prefix_tokens"], len(case["fp32_ids"]))
    assert first_tokens_identical >= rule["min_prompts"], first_tokens_identical


def test_rows_are_batch_invariant(lm: OnnxCausalLM, manifest: Manifest, tokenizer: Tokenizer) -> None:
    """Each prompt alone and inside a right-padded batch of 8: same logits, same greedy tokens."""
    prompts = [chat(tokenizer, manifest, text) for text in BATCH_PROMPTS]
    assert len({len(p) for p in prompts}) > 4  # real padding
    batch_logits: list[np.ndarray] = []
    batch = lm.greedy(prompts, 16, manifest.tokens.pad, keep_logits=batch_logits)
    for row, prompt in enumerate(prompts):
        alone_logits: list[np.ndarray] = []
        alone = lm.greedy([prompt], 16, manifest.tokens.pad, keep_logits=alone_logits)
        assert alone[0] == batch[row], BATCH_PROMPTS[row]
        for step, logits in enumerate(alone_logits):
            np.testing.assert_allclose(logits[0], batch_logits[step][row], rtol=0, atol=1e-4)


def test_rows_of_different_lengths_decode_together(lm: OnnxCausalLM, manifest: Manifest,
                                                   tokenizer: Tokenizer) -> None:
    """A row that joins a running batch (its cache copied in, right-padded) continues exactly as alone."""
    first, second = (chat(tokenizer, manifest, t) for t in BATCH_PROMPTS[2:4])
    pad = manifest.tokens.pad
    alone = lm.greedy([second], 6, pad)[0]

    # `first` has already decoded 5 tokens when `second` joins.
    logits_a, len_a, past_a = lm.prefill([first], pad)
    for _ in range(5):
        token = logits_a.argmax(-1)
        len_a = len_a + 1
        logits_a, past_a = lm.forward(token[:, None], length_mask(len_a, past_len(past_a) + 1), past_a)
    logits_b, len_b, past_b = lm.prefill([second], pad)
    width = max(past_len(past_a), past_len(past_b))
    merged = {}
    for name in past_a:
        buffer = np.zeros((2, lm.kv_heads, width, lm.head_dim), dtype=np.float32)
        buffer[0, :, : past_len(past_a)] = past_a[name][0]
        buffer[1, :, : past_len(past_b)] = past_b[name][0]
        merged[name] = buffer
    lengths = np.concatenate([len_a, len_b])
    tokens = np.stack([logits_a.argmax(-1), logits_b.argmax(-1)], axis=0)[:, 0]
    joined = [int(tokens[1])]
    for _ in range(5):
        lengths = lengths + 1
        logits, merged = lm.forward(tokens[:, None], length_mask(lengths, width + 1), merged)
        width += 1
        tokens = logits.argmax(-1)
        joined.append(int(tokens[1]))
    assert joined == alone


def test_static_shared_kv_buffers_decode_like_growing_ones(lm: OnnxCausalLM, manifest: Manifest,
                                                           tokenizer: Tokenizer) -> None:
    """Past and present bound to one preallocated buffer (in-place cache) give the same tokens."""
    prompts = [chat(tokenizer, manifest, text) for text in BATCH_PROMPTS]
    growing = lm.greedy(prompts, 12, manifest.tokens.pad)
    decoder = StaticCacheDecoder(lm, batch=len(prompts), max_length=128)
    assert decoder.greedy(prompts, 12, manifest.tokens.pad) == growing
    # The buffers are reused: a second, shorter request overwrites the first one's cache.
    assert decoder.greedy(prompts[::-1], 12, manifest.tokens.pad) == growing[::-1]
