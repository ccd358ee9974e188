"""Record tests/data/golden.json from the fp32 export of the bundled model.

    python -m services.inference.modelbuild.record_golden [--int8-dir DIR]

For each chat prompt: the fp32 model's first 16 greedy tokens (ids and text). Also the fp32
perplexity on tests/data/prose.txt. With the INT8 build (default: build or reuse it), records how
many prompts the INT8 model reproduces exactly, and the divergence rule the tests enforce.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from tokenizers import Tokenizer

from services.inference.modelbuild.chat_template import render_chat
from services.inference.modelbuild.manifest import load_manifest
from services.inference.modelbuild.ort_runner import OnnxCausalLM

DATA = Path(__file__).resolve().parents[3] / "tests" / "data"
NEW_TOKENS = 16
PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about rain.",
    "Explain gravity to a child in two sentences.",
    "List three fruits that are red.",
    "What is 12 times 7?",
    "Translate 'good morning' into Spanish.",
    "Give me one tip for sleeping better on a hot night.",
    "What does a compiler do?",
    "Name the planets of the solar system in order.",
    "Suggest a name for a small bakery by the sea.",
    "Why is the sky blue?",
    "Write the first line of a story about a lighthouse keeper.",
]


def chat_ids(tokenizer: Tokenizer, template: str, prompt: str) -> list[int]:
    text = render_chat(template, [{"role": "user", "content": prompt}])
    return list(tokenizer.encode(text, add_special_tokens=False).ids)


def continuations(lm: OnnxCausalLM, prompts: list[list[int]], pad_id: int, eos: tuple[int, ...],
                  new_tokens: int = NEW_TOKENS) -> list[list[int]]:
    return [lm.greedy([ids], new_tokens, pad_id, eos)[0] for ids in prompts]


def prefix_match(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def main() -> None:
    from services.inference.modelbuild.build import build
    from services.inference.modelbuild.export import load_checkpoint, write_fp32_onnx
    from services.inference.modelbuild.source import resolve

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--int8-dir", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=DATA / "golden.json")
    args = parser.parse_args()

    int8_dir = args.int8_dir or build(None).path
    manifest = load_manifest(int8_dir)
    tokenizer = Tokenizer.from_file(str(int8_dir / manifest.tokenizer_file))
    assert manifest.chat_template is not None
    prompts = [chat_ids(tokenizer, manifest.chat_template, p) for p in PROMPTS]
    eos = tuple(manifest.tokens.eos)
    prose_ids = list(tokenizer.encode((DATA / "prose.txt").read_text(encoding="utf-8")).ids)

    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = load_checkpoint(resolve(None, Path(tmp) / "download"))
        fp32 = OnnxCausalLM(write_fp32_onnx(checkpoint, Path(tmp) / "fp32"))
        fp32_out = continuations(fp32, prompts, manifest.tokens.pad, eos)
        fp32_ppl = fp32.perplexity(prose_ids)
        del fp32

    int8 = OnnxCausalLM(int8_dir / manifest.model_file)
    int8_out = continuations(int8, prompts, manifest.tokens.pad, eos)
    int8_ppl = int8.perplexity(prose_ids)
    matches = [prefix_match(a, b) for a, b in zip(fp32_out, int8_out, strict=True)]
    full = sum(m == len(a) for m, a in zip(matches, fp32_out, strict=True))

    golden = {
        "model": {"name": manifest.name, "source_sha256": manifest.source.sha256,
                  "reference": "fp32 ONNX export (same graph, unquantized weights)"},
        "new_tokens": NEW_TOKENS,
        "prose": {"file": "prose.txt", "tokens": len(prose_ids), "fp32_perplexity": round(fp32_ppl, 4),
                  "int8_perplexity_at_recording": round(int8_ppl, 4), "max_relative_increase": 0.10},
        "int8_agreement_at_recording": {
            "prompts_fully_identical": full, "prompts": len(prompts),
            "identical_prefix_lengths": matches,
        },
        "divergence_rule": {
            "description": "INT8 greedy output must equal the fp32 tokens for the first `prefix_tokens` "
                           "tokens on at least `min_prompts` prompts (or up to EOS when shorter)",
            "prefix_tokens": 8,
            "min_prompts": len(prompts) - 2,
        },
        "prompts": [
            {"user": text, "prompt_ids": ids, "fp32_ids": out,
             "fp32_text": tokenizer.decode(out, skip_special_tokens=False)}
            for text, ids, out in zip(PROMPTS, prompts, fp32_out, strict=True)
        ],
    }
    args.out.write_text(json.dumps(golden, indent=1) + "\n", encoding="utf-8")
    print(json.dumps({"fp32_ppl": fp32_ppl, "int8_ppl": int8_ppl, "matches": matches, "full": full}))


if __name__ == "__main__":
    main()
