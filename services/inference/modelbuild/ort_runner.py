"""A small ONNX Runtime loop over a built model: greedy decoding, perplexity, batch checks.

Needs only numpy and onnxruntime. It documents (and the tests prove) the padding convention:
prompts are RIGHT-padded; attention_mask row b holds n_b ones (real tokens so far, past + new)
followed by zeros; each decode step feeds one token per row and n_b grows by one. The KV-cache
of row b is valid on positions [0, n_b); the rest of the buffer is ignored.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort

PAST_PREFIX = "past_key_values."
PRESENT_PREFIX = "present."


@dataclass
class StepTimings:
    first_token_s: float = 0.0
    decode_s: list[float] = field(default_factory=list)

    @property
    def decode_tokens_per_s(self) -> float:
        total = sum(self.decode_s)
        return len(self.decode_s) / total if total else 0.0


def session_options(threads: int = 2, level: ort.GraphOptimizationLevel | None = None,
                    optimized_path: Path | None = None) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = level if level is not None else \
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if optimized_path is not None:
        options.optimized_model_filepath = str(optimized_path)
    return options


class OnnxCausalLM:
    def __init__(self, model_path: Path, options: ort.SessionOptions | None = None, min_rows: int = 1) -> None:
        self.min_rows = min_rows  # greedy runs at least this many rows (copies of the first), as the engine does
        self.session = ort.InferenceSession(str(model_path), options or session_options(),
                                            providers=["CPUExecutionProvider"])
        self.past_names = [i.name for i in self.session.get_inputs() if i.name.startswith(PAST_PREFIX)]
        self.present_names = [o.name for o in self.session.get_outputs()
                              if o.name.startswith(PRESENT_PREFIX)]
        shape = next(i.shape for i in self.session.get_inputs() if i.name.startswith(PAST_PREFIX))
        self.kv_heads, self.head_dim = int(shape[1]), int(shape[3])
        self.output_names = ["logits", *self.present_names]

    def empty_past(self, batch: int) -> dict[str, np.ndarray]:
        empty = np.zeros((batch, self.kv_heads, 0, self.head_dim), dtype=np.float32)
        return {name: empty for name in self.past_names}

    def forward(self, input_ids: np.ndarray, attention_mask: np.ndarray,
                past: dict[str, np.ndarray]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        feed = {"input_ids": input_ids, "attention_mask": attention_mask, **past}
        logits, *presents = self.session.run(self.output_names, feed)
        new_past = {p: v for p, v in zip(self.past_names, presents, strict=True)}
        return logits[:, -1, :], new_past

    def prefill(self, prompts: list[list[int]], pad_id: int
                ) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
        """Right-pads the prompts and runs them; returns each row's last-token logits, lengths, cache."""
        ids, mask = right_pad(prompts, pad_id)
        logits, past = self.forward(ids, mask, self.empty_past(len(prompts)))
        return logits, mask.sum(axis=1).astype(np.int64), past

    def greedy(self, prompts: list[list[int]], max_new_tokens: int, pad_id: int,
               eos_ids: tuple[int, ...] = (), timings: StepTimings | None = None,
               keep_logits: list[np.ndarray] | None = None) -> list[list[int]]:
        """Greedy continuation of each prompt (stops a row at EOS)."""
        asked = len(prompts)
        if asked < self.min_rows:
            prompts = prompts + [prompts[0]] * (self.min_rows - asked)
            if keep_logits is not None:
                kept: list[np.ndarray] = []
                padded = self.greedy(prompts, max_new_tokens, pad_id, eos_ids, timings, kept)
                keep_logits.extend(logits[:asked] for logits in kept)
                return padded[:asked]
            return self.greedy(prompts, max_new_tokens, pad_id, eos_ids, timings)[:asked]
        start = time.perf_counter()
        logits, lengths, past = self.prefill(prompts, pad_id)
        if timings is not None:
            timings.first_token_s = time.perf_counter() - start
        out: list[list[int]] = [[] for _ in prompts]
        done = np.zeros(len(prompts), dtype=bool)
        for step in range(max_new_tokens):
            if keep_logits is not None:
                keep_logits.append(logits.copy())
            tokens = logits.argmax(axis=-1).astype(np.int64)
            for row, token in enumerate(tokens):
                if not done[row]:
                    out[row].append(int(token))
                    done[row] = int(token) in eos_ids
            if done.all() or step == max_new_tokens - 1:
                break
            tick = time.perf_counter()
            lengths = lengths + 1
            logits, past = self.forward(tokens[:, None], length_mask(lengths, past_len(past) + 1), past)
            if timings is not None:
                timings.decode_s.append(time.perf_counter() - tick)
        return out

    def perplexity(self, tokens: list[int]) -> float:
        return self.score(tokens)[0]

    def score(self, tokens: list[int]) -> tuple[float, list[int]]:
        """Teacher-forced pass over tokens, one token at a time through the KV-cache.

        Returns exp(mean NLL) of tokens[1:] and the argmax prediction at every position.
        """
        past = self.empty_past(1)
        nll = 0.0
        top1: list[int] = []
        for i in range(len(tokens) - 1):
            ids = np.array([[tokens[i]]], dtype=np.int64)
            logits, past = self.forward(ids, np.ones((1, i + 1), dtype=np.int64), past)
            row = logits[0].astype(np.float64)
            top = row.max()
            log_z = top + math.log(np.exp(row - top).sum())
            nll += log_z - row[tokens[i + 1]]
            top1.append(int(row.argmax()))
        return math.exp(nll / (len(tokens) - 1)), top1


def right_pad(prompts: list[list[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    width = max(len(p) for p in prompts)
    ids = np.full((len(prompts), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(prompts), width), dtype=np.int64)
    for row, prompt in enumerate(prompts):
        ids[row, :len(prompt)] = prompt
        mask[row, :len(prompt)] = 1
    return ids, mask


def length_mask(lengths: np.ndarray, width: int) -> np.ndarray:
    """attention_mask for rows with `lengths` real tokens in a window of `width` positions."""
    return (np.arange(width)[None, :] < lengths[:, None]).astype(np.int64)


def past_len(past: dict[str, np.ndarray]) -> int:
    return int(next(iter(past.values())).shape[2])


class StaticCacheDecoder:
    """Greedy decoding with preallocated KV buffers shared between past and present (IOBinding).

    GroupQueryAttention writes each step's keys/values in place when a present output is bound
    to the same buffer as its past input, so nothing is copied per step. Buffers have room for
    `max_length` tokens; attention_mask still has width = the longest row so far.
    """

    def __init__(self, lm: OnnxCausalLM, batch: int, max_length: int) -> None:
        self.lm = lm
        shape = (batch, lm.kv_heads, max_length, lm.head_dim)
        self.buffers = {name: ort.OrtValue.ortvalue_from_numpy(np.zeros(shape, dtype=np.float32))
                        for name in lm.past_names}
        self.max_length = max_length
        self.binding = lm.session.io_binding()
        self.binding.bind_output("logits")  # first bound output = first of get_outputs()
        for past, present in zip(lm.past_names, lm.present_names, strict=True):
            self.binding.bind_ortvalue_input(past, self.buffers[past])
            self.binding.bind_ortvalue_output(present, self.buffers[past])

    def _run(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        # Cache buffers stay bound across steps; only the token ids and the mask change.
        binding = self.binding
        binding.bind_cpu_input("input_ids", input_ids)
        binding.bind_cpu_input("attention_mask", attention_mask)
        self.lm.session.run_with_iobinding(binding)
        logits: np.ndarray = binding.get_outputs()[0].numpy()
        return logits[:, -1, :]

    def greedy(self, prompts: list[list[int]], max_new_tokens: int, pad_id: int,
               eos_ids: tuple[int, ...] = (), timings: StepTimings | None = None) -> list[list[int]]:
        if max(len(p) for p in prompts) + max_new_tokens > self.max_length:
            raise ValueError("prompt + new tokens exceed the KV buffer")
        start = time.perf_counter()
        ids, mask = right_pad(prompts, pad_id)
        logits = self._run(ids, mask)
        if timings is not None:
            timings.first_token_s = time.perf_counter() - start
        lengths = mask.sum(axis=1).astype(np.int64)
        out: list[list[int]] = [[] for _ in prompts]
        done = np.zeros(len(prompts), dtype=bool)
        for step in range(max_new_tokens):
            tokens = logits.argmax(axis=-1).astype(np.int64)
            for row, token in enumerate(tokens):
                if not done[row]:
                    out[row].append(int(token))
                    done[row] = int(token) in eos_ids
            if done.all() or step == max_new_tokens - 1:
                break
            tick = time.perf_counter()
            lengths = lengths + 1
            logits = self._run(tokens[:, None], length_mask(lengths, int(lengths.max())))
            if timings is not None:
                timings.decode_s.append(time.perf_counter() - tick)
        return out
