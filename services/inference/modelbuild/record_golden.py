"""Record tests/data/golden.json from the fp32 export of the bundled model.

    python -m services.inference.modelbuild.record_golden [--int8-dir DIR]

For each chat prompt: its ids as serving renders and tokenizes it (the serving chat template,
`services.inference.chat_template`, with the model's special tokens), and the fp32 model's first 16
greedy tokens (ids and text). Also the fp32
perplexity on tests/data/prose.txt. With the INT8 build (default: build or reuse it), records how
many prompts the INT8 model reproduces exactly, and the divergence rule the tests enforce.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from services.common.generation import ChatMessage, Role
from services.inference.chat_template import ChatTemplate
from services.inference.modelbuild.manifest import load_manifest
from services.inference.modelbuild.ort_runner import OnnxCausalLM

DATA = Path(__file__).resolve().parents[3] / "tests" / "data"
NEW_TOKENS = 16
# fp32 top-2 logit gap below which the next greedy token may go either way for the INT8 model. Teacher-forced
# on prose.txt, INT8's top-1 differs from fp32's at 42 of 1,140 positions, at fp32 gaps of up to 0.40, and
# its logits move by up to ~1.0 against fp32's: which side of a gap under ~0.4 wins also depends on the CPU's
# int8 kernels (VNNI or AMX), so the rule counts gaps under 0.5 as ties.
NEAR_TIE = 0.5
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


def chat_ids(template: ChatTemplate, tokenizer: Tokenizer, prompt: str) -> list[int]:
    """A one-turn chat prompt's ids, rendered and tokenized exactly as serving does."""
    text = template.render([ChatMessage(Role.USER, prompt)])
    return list(tokenizer.encode(text, add_special_tokens=False).ids)


def continuations(lm: OnnxCausalLM, prompts: list[list[int]], pad_id: int, eos: tuple[int, ...],
                  new_tokens: int = NEW_TOKENS) -> tuple[list[list[int]], list[list[float]]]:
    """Greedy tokens per prompt, and at each step the gap between the two best logits."""
    tokens, margins = [], []
    for ids in prompts:
        steps: list[np.ndarray] = []
        tokens.append(lm.greedy([ids], new_tokens, pad_id, eos, keep_logits=steps)[0])
        margins.append([round(float(np.diff(np.sort(s[0])[-2:])[0]), 4) for s in steps])
    return tokens, margins


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
    template = ChatTemplate.for_model(manifest, tokenizer)
    prompts = [chat_ids(template, tokenizer, p) for p in PROMPTS]
    eos = tuple(manifest.tokens.eos)
    prose_ids = list(tokenizer.encode((DATA / "prose.txt").read_text(encoding="utf-8")).ids)

    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = load_checkpoint(resolve(None, Path(tmp) / "download"))
        fp32 = OnnxCausalLM(write_fp32_onnx(checkpoint, Path(tmp) / "fp32"))
        fp32_out, fp32_margins = continuations(fp32, prompts, manifest.tokens.pad, eos)
        fp32_ppl, fp32_top1 = fp32.score(prose_ids)
        del fp32

    int8 = OnnxCausalLM(int8_dir / manifest.model_file)
    int8_out, _ = continuations(int8, prompts, manifest.tokens.pad, eos)
    int8_ppl, int8_top1 = int8.score(prose_ids)
    top1_agreement = float(np.mean(np.array(fp32_top1) == np.array(int8_top1)))
    matches = [prefix_match(a, b) for a, b in zip(fp32_out, int8_out, strict=True)]
    full = sum(m == len(a) for m, a in zip(matches, fp32_out, strict=True))
    first8 = sum(m >= min(8, len(a)) for m, a in zip(matches, fp32_out, strict=True))
    margins_at_divergence = [ms[m] for m, ms, a in zip(matches, fp32_margins, fp32_out, strict=True)
                             if m < len(a)]

    golden = {
        "model": {"name": manifest.name, "source_sha256": manifest.source.sha256,
                  "reference": "fp32 ONNX export (same graph, unquantized weights)"},
        "new_tokens": NEW_TOKENS,
        "prose": {"file": "prose.txt", "tokens": len(prose_ids), "fp32_perplexity": round(fp32_ppl, 4),
                  "int8_perplexity_at_recording": round(int8_ppl, 4), "max_relative_increase": 0.10,
                  "int8_top1_agreement_at_recording": round(top1_agreement, 4), "min_top1_agreement": 0.95,
                  "fp32_top1": fp32_top1},
        "int8_agreement_at_recording": {
            "prompts": len(prompts), "all_16_identical": full, "first_8_identical": first8,
            "identical_prefix_lengths": matches,
            "fp32_margin_where_int8_diverged": margins_at_divergence,
        },
        "divergence_rule": {
            "description": "Per prompt, INT8 greedy tokens equal the fp32 tokens up to the first step where "
                           "the fp32 top-2 logit gap is below `near_tie` (any later step may differ). Across "
                           "prompts, the first `prefix_tokens` tokens (or up to EOS) are identical on at "
                           "least `min_prompts`. On prose.txt, teacher-forced INT8 argmax equals fp32's on "
                           "at least `prose.min_top1_agreement` of positions.",
            "near_tie": NEAR_TIE,
            "prefix_tokens": 8,
            "min_prompts": 7,
        },
        "prompts": [
            {"user": text, "prompt_ids": ids, "fp32_ids": out, "fp32_margins": margins,
             "fp32_text": tokenizer.decode(out, skip_special_tokens=False)}
            for text, ids, out, margins in zip(PROMPTS, prompts, fp32_out, fp32_margins, strict=True)
        ],
    }
    args.out.write_text(json.dumps(golden, indent=1) + "\n", encoding="utf-8")
    print(json.dumps({"fp32_ppl": fp32_ppl, "int8_ppl": int8_ppl, "matches": matches, "full": full,
                      "first8": first8, "top1_agreement": top1_agreement,
                      "margins_at_divergence": margins_at_divergence}))


if __name__ == "__main__":
    main()
