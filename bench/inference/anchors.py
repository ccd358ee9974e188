"""The benchmark's anchors on the same model and CPU: llama.cpp (llama-cpp-python on the GGUF, and on the
same weights requantized to its 8-bit Q8_0 by its own quantizer) and onnxruntime-genai's Generator on an
INT8 and INT4 models from its own builder.

The genai builder needs a Hugging Face folder; it is exported once from the GGUF with transformers
(eos/pad set to <|im_end|>, which this GGUF misreports) into the bench cache, then built once with
`python -m onnxruntime_genai.models.builder -p int8|int4 -e cpu` with this engine's block size and
accuracy level (GENAI_BUILD_OPTIONS, recorded), and run with the same intra-op threads, set in its
genai_config.json. Every run measures: greedy, the same ~108-token prompt, 128 new tokens (genai's
rows are held to exactly that many; llama.cpp's loop takes exactly that many), TTFT and decode
tokens/s at batch 1, aggregate at batch 16 over the same 16 distinct prompts as ours.
Failures are returned as {"error": reason} so the results file says exactly why an anchor is missing.
The chat anchor (`chat`, `run_isolated_chat`) holds a conversation in llama.cpp with its prompt cache
(`LlamaRAMCache`): the given user turns, its own greedy answers in the history, TTFT per turn.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

CHATML_END = "<|im_end|>"
REPEATS = 3
_loaded: dict[tuple[str, str, int], Any] = {}  # runner, path, threads -> loaded model (once per process)


def bench_cache(environ: dict[str, str] | None = None) -> Path:
    env = os.environ if environ is None else environ
    return Path(env.get("AUTOGLM_BENCH_CACHE", Path.home() / ".cache" / "autoglm" / "bench")).expanduser()


# ---- llama.cpp --------------------------------------------------------------------------------------
def bench_llama_cpp(gguf: Path, prompt_ids: list[int], new_tokens: int, threads: int,
                    repeats: int = REPEATS) -> dict[str, Any]:
    try:
        import llama_cpp  # noqa: F401
    except ImportError as err:
        return {"error": f"llama-cpp-python not installed ({err}); `make bench-inference-deps` installs it"}
    plain = os.environ.get(NO_EXTRA_BUFFERS) == "1"
    llm = _llama(gguf, threads)
    tokens = llm.tokenize(_detok_llama(llm, prompt_ids), add_bos=False, special=True)
    _llama_run(llm, tokens, 4)
    ttfts, decodes, counts = [], [], set()
    for _ in range(repeats):
        first, total, count = _llama_run(llm, tokens, new_tokens)
        ttfts.append(first)
        decodes.append((count - 1) / (total - first))
        counts.add(count)
    return {"prompt_tokens": len(tokens), "threads": threads, "ttft_ms": statistics.median(ttfts) * 1000,
            "batch1_decode_tok_s": statistics.median(decodes), "runs": repeats, "new_tokens_per_row": sorted(counts),
            "version": _version("llama_cpp"), "extra_buffer_types": "off" if plain else "default"}


def _llama(gguf: Path, threads: int, n_ctx: int = 1024) -> Any:
    """The model loaded once per process, with llama.cpp's plain CPU buffers when NO_EXTRA_BUFFERS says so."""
    from llama_cpp import Llama

    key = ("llama", f"{gguf}:{n_ctx}", threads)
    if key not in _loaded:
        if os.environ.get(NO_EXTRA_BUFFERS) == "1":  # no AMX or repacked layouts
            import llama_cpp.llama_cpp as native

            defaults = native.llama_model_default_params

            def without_extra_buffers() -> Any:
                params = defaults()
                params.use_extra_bufts = False
                return params

            native.llama_model_default_params = without_extra_buffers  # type: ignore[assignment]
        _loaded[key] = Llama(model_path=str(gguf), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads,
                             n_batch=512, verbose=False)
    return _loaded[key]


def bench_llama_chat(gguf: Path, turns: list[str], answer_tokens: int, threads: int) -> dict[str, Any]:
    """One conversation through llama-cpp-python's chat API with LlamaRAMCache: TTFT (ms) of each turn
    (to the first text) and the tokens in its context after each turn."""
    try:
        from llama_cpp import LlamaRAMCache
    except ImportError as err:
        return {"error": f"llama-cpp-python not installed ({err}); `make bench-inference-deps` installs it"}
    llm = _llama(gguf, threads, n_ctx=4096)
    llm.set_cache(LlamaRAMCache(capacity_bytes=1 << 30))

    def ask(history: list[dict[str, str]], max_tokens: int) -> tuple[float, str]:
        start, first, parts = time.perf_counter(), 0.0, []
        for chunk in llm.create_chat_completion(messages=history, max_tokens=max_tokens, temperature=0.0, top_k=1,
                                                top_p=1.0, repeat_penalty=1.0, stream=True):
            delta = chunk["choices"][0]["delta"].get("content")
            if delta:
                first = first or time.perf_counter() - start
                parts.append(delta)
        return first, "".join(parts)

    ask([{"role": "user", "content": "Hello"}], 4)  # warm-up, as the services get
    history: list[dict[str, str]] = []
    ttft, context = [], []
    for text in turns:
        history.append({"role": "user", "content": text})
        first, answer = ask(history, answer_tokens)
        history.append({"role": "assistant", "content": answer})
        ttft.append(first * 1000)
        context.append(llm.n_tokens)
    return {"ttft_ms": ttft, "prompt_tokens": context, "threads": threads, "prompt_cache": "LlamaRAMCache (1 GiB)",
            "version": _version("llama_cpp"),
            "extra_buffer_types": "off" if os.environ.get(NO_EXTRA_BUFFERS) == "1" else "default"}


def run_isolated_chat(gguf: Path, turns: list[str], answer_tokens: int, threads: int) -> dict[str, Any]:
    """bench_llama_chat in its own process (retried with plain buffers on a crash, as run_isolated)."""
    return run_isolated("llama-chat", gguf, [], answer_tokens, threads, extra=json.dumps(turns))


def llama_int8_gguf(gguf: Path, cache: Path) -> Path:
    """The same weights as llama.cpp's own 8-bit format (Q8_0), requantized once from the GGUF with
    llama.cpp's quantizer: the anchor at the precision this engine runs (INT8), beside the 4-bit original.
    Q8_0 holds every Q4_1 weight value (a 4-bit code times its block's scale, plus its minimum) to within
    8-bit rounding, so no weight the original has is lost."""
    target = cache / f"{gguf.stem.split('.')[0]}.Q8_0-from-{gguf.stem.split('.')[-1]}.gguf"
    if target.is_file():
        return target
    import ctypes

    import llama_cpp

    cache.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0
    params.allow_requantize = True
    if llama_cpp.llama_model_quantize(str(gguf).encode(), str(partial).encode(), ctypes.byref(params)) != 0:
        raise RuntimeError(f"llama.cpp could not requantize {gguf.name} to Q8_0")
    partial.replace(target)
    return target


def _detok_llama(llm: Any, ids: list[int]) -> bytes:
    return bytes(llm.detokenize(ids, special=True))


def _llama_run(llm: Any, tokens: list[int], new_tokens: int) -> tuple[float, float, int]:
    """Greedy generation token by token: (seconds to first token, seconds total, tokens)."""
    llm.reset()
    start = time.perf_counter()
    first, count = 0.0, 0
    for _token in llm.generate(tokens, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0, reset=True):
        if not first:
            first = time.perf_counter() - start
        count += 1
        if count >= new_tokens:
            break
    return first, time.perf_counter() - start, count


# ---- onnxruntime-genai ---------------------------------------------------------------------------------
def hf_folder(gguf: Path, cache: Path) -> Path:
    """A Hugging Face folder exported from the GGUF (once): model + tokenizer, eos/pad = <|im_end|>."""
    folder = cache / f"hf-{gguf.stem}"
    if (folder / "config.json").is_file() and (folder / "tokenizer.json").is_file():
        return folder
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    # The GGUF weights are dequantized on load, but the model stays marked "quantized with gguf",
    # which save_pretrained refuses: copy them into a plain model of the same config.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    end = tokenizer.convert_tokens_to_ids(CHATML_END)
    tokenizer.eos_token = tokenizer.pad_token = CHATML_END
    model.config.eos_token_id = model.config.pad_token_id = end
    if model.generation_config is not None:
        model.generation_config.eos_token_id = model.generation_config.pad_token_id = end
    partial = folder.with_name(folder.name + ".partial")
    model.save_pretrained(str(partial))
    tokenizer.save_pretrained(str(partial))
    partial.rename(folder)
    return folder


# The builder's quantization options, the same as this engine's builds (block 32, accuracy level 4: int8
# compute; the INT4 build with zero points, as ours carries the GGUF's Q4_1 minimums).
GENAI_BUILD_OPTIONS = {
    "int8": ["int4_block_size=32", "int4_accuracy_level=4"],
    "int4": ["int4_block_size=32", "int4_accuracy_level=4", "int4_is_symmetric=false"],
}


def genai_model(gguf: Path, cache: Path, precision: str = "int8") -> Path:
    """onnxruntime-genai's own CPU model at `precision`, built once by its builder from the exported
    folder with GENAI_BUILD_OPTIONS (recorded in the folder as autoglm_build.json)."""
    options = GENAI_BUILD_OPTIONS[precision]
    out = cache / f"genai-{precision}-cpu-b32-acc4-{gguf.stem}"
    if (out / "genai_config.json").is_file():
        return out
    source = hf_folder(gguf, cache)
    partial = out.with_name(out.name + ".partial")
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(source), "-o", str(partial),
           "-p", precision, "-e", "cpu", "-c", str(cache / "genai-build-tmp"), "--extra_options", *options]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0 or not (partial / "genai_config.json").is_file():
        raise RuntimeError(f"onnxruntime-genai builder failed ({done.returncode}): {done.stderr.strip()[-1500:]}")
    (partial / "autoglm_build.json").write_text(json.dumps({"command": cmd[1:], "precision": precision,
                                                            "extra_options": options,
                                                            "matmulnbits": _matmulnbits(partial)}))
    partial.rename(out)
    return out


def _matmulnbits(folder: Path) -> dict[str, int]:
    """What the builder made: MatMulNBits nodes counted by "bits=B block_size=S accuracy_level=A"."""
    import onnx

    counts: dict[str, int] = {}
    for path in folder.glob("*.onnx"):
        for node in onnx.load(str(path), load_external_data=False).graph.node:
            if node.op_type == "MatMulNBits":
                attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
                key = " ".join(f"{k}={attrs.get(k)}" for k in ("bits", "block_size", "accuracy_level"))
                counts[key] = counts.get(key, 0) + 1
    return counts


def _genai_threads(folder: Path, threads: int) -> dict[str, Any]:
    """Set the decoder's intra-op threads in the model's genai_config.json; the session options in force."""
    path = folder / "genai_config.json"
    config = json.loads(path.read_text())
    session = config["model"]["decoder"].setdefault("session_options", {})
    if session.get("intra_op_num_threads") != threads:
        session["intra_op_num_threads"] = threads
        path.write_text(json.dumps(config, indent=4))
    return dict(session)


def bench_genai(gguf: Path, prompts: list[list[int]], new_tokens: int, batch: int, threads: int,
                precision: str = "int8", repeats: int = REPEATS) -> dict[str, Any]:
    """Batch 1 on prompts[0], batch `batch` on the first `batch` prompts (distinct, the same as ours);
    every row decodes exactly `new_tokens` (min_length = max_length: EOS cannot end a row early)."""
    try:
        import onnxruntime_genai as og
    except ImportError as err:
        return {"error": f"onnxruntime-genai not installed ({err}); `make bench-inference-deps` installs it"}
    try:
        folder = genai_model(gguf, bench_cache(), precision)
    except Exception as err:
        return {"error": f"could not build the onnxruntime-genai {precision} model: {type(err).__name__}: {err}"}
    session = _genai_threads(folder, threads)
    key = ("genai", str(folder), threads)
    if key not in _loaded:
        _loaded[key] = og.Model(str(folder))
    model = _loaded[key]
    _genai_run(og, model, prompts[:1], 4)  # warm-up, as every runner gets
    ttfts, decodes, aggregates, counts = [], [], [], set()
    for _ in range(repeats):
        first, total, count = _genai_run(og, model, prompts[:1], new_tokens)
        ttfts.append(first)
        decodes.append((count - 1) / (total - first))
        counts.add(count)
    rows = prompts[:batch]
    for _ in range(repeats):
        _first, total, count = _genai_run(og, model, rows, new_tokens)
        aggregates.append(count / total)
        counts.add(count // len(rows))
    build = folder / "autoglm_build.json"
    return {"prompt_tokens": len(prompts[0]), "ttft_ms": statistics.median(ttfts) * 1000,
            "batch1_decode_tok_s": statistics.median(decodes), f"batch{batch}_aggregate_tok_s":
            statistics.median(aggregates), "runs": repeats, "model": str(folder), "precision": precision,
            "new_tokens_per_row": sorted(counts), f"batch{batch}_distinct_prompts": len({tuple(p) for p in rows}),
            "session_options": session, "threads": threads,
            "builder": json.loads(build.read_text()) if build.is_file() else "unknown (built before options were recorded)",
            "version": _version("onnxruntime_genai")}


def _genai_run(og: Any, model: Any, prompts: list[list[int]], new_tokens: int) -> tuple[float, float, int]:
    """Greedy, exactly new_tokens per row: (seconds to first token, seconds total, tokens over all rows)."""
    params = og.GeneratorParams(model)
    length = len(prompts[0]) + new_tokens
    params.set_search_options(do_sample=False, max_length=length, min_length=length, batch_size=len(prompts))
    start = time.perf_counter()
    generator = og.Generator(model, params)
    generator.append_tokens(prompts)
    first, count = 0.0, 0
    while not generator.is_done():
        generator.generate_next_token()
        if not first:
            first = time.perf_counter() - start
        count += len(prompts)
    return first, time.perf_counter() - start, count


def _version(module: str) -> str:
    try:
        return str(__import__(module).__version__)
    except Exception:
        return "unknown"


def run_isolated(runner: str, gguf: Path, prompt_ids: list[int], new_tokens: int, threads: int,
                 batch: int = 16, extra: str = "") -> dict[str, Any]:
    """One measurement of an anchor in its own process, so that no runner's thread pools or memory
    share a process with another's."""
    cmd = [sys.executable, "-m", "bench.inference.anchors", runner, str(gguf), ",".join(map(str, prompt_ids)),
           str(new_tokens), str(threads), str(batch)]
    root = Path(__file__).resolve().parents[2]
    family = runner.split("-")[0]  # llama and llama-chat share what worked
    env = {**os.environ, **_anchor_env.get(family, {})}
    done = subprocess.run(cmd, capture_output=True, text=True, check=False, cwd=root, env=env, input=extra)
    if family == "llama" and done.returncode < 0 and family not in _anchor_env:
        # llama.cpp built for this CPU may pick its AMX buffer type, which dies with a signal on some
        # machines (SIGSEGV on the first token, seen on a 2-core Sapphire Rapids guest): from then on this
        # run measures it with its plain CPU buffers, and says so in the result.
        _anchor_env[family] = {NO_EXTRA_BUFFERS: "1"}
        return run_isolated(runner, gguf, prompt_ids, new_tokens, threads, batch, extra)
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        return {"error": f"{runner} anchor exited {done.returncode}: {done.stderr.strip()[-1000:]}"}
    return dict(json.loads(lines[-1]))


NO_EXTRA_BUFFERS = "AUTOGLM_BENCH_LLAMA_NO_EXTRA_BUFFERS"
_anchor_env: dict[str, dict[str, str]] = {}  # per runner: environment that worked in this run


def _main(argv: list[str]) -> None:
    if argv[0] == "build":  # python -m bench.inference.anchors build GGUF [PRECISION]: a genai model ahead of a run
        print(genai_model(Path(argv[1]), bench_cache(), *argv[2:3]))
        return
    runner, gguf, ids, new_tokens, threads, batch = argv[0], Path(argv[1]), argv[2], *map(int, argv[3:6])
    prompt = [int(x) for x in ids.split(",") if x]
    if runner == "llama":
        result = bench_llama_cpp(gguf, prompt, new_tokens, threads, repeats=1)
    elif runner == "llama-chat":  # the user turns come as JSON on stdin
        result = bench_llama_chat(gguf, json.loads(sys.stdin.read()), new_tokens, threads)
    else:  # genai or genai-int4; the batch's prompts come as JSON on stdin (else the one prompt, repeated)
        extra = sys.stdin.read()
        prompts = json.loads(extra) if extra else [prompt] * batch
        precision = runner.split("-")[1] if "-" in runner else "int8"
        result = bench_genai(gguf, prompts, new_tokens, batch, threads, precision, repeats=1)
    print(json.dumps(result))


if __name__ == "__main__":
    _main(sys.argv[1:])
