"""Token selection: greedy, temperature, top-k, top-p and repetition penalty, per-request seeded.

Every sequence owns its numpy Generator, so a seeded request draws the same numbers whatever else
runs in its batch; the math runs in float64 on one row of logits at a time.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SamplingParams:
    """Resolved settings (defaults applied, ranges checked). temperature 0 means greedy."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


class Sampler:
    def __init__(self, params: SamplingParams) -> None:
        self.params = params
        seed = params.seed if params.seed is not None else secrets.randbits(64)
        self._rng = np.random.default_rng(seed)

    @property
    def plain_greedy(self) -> bool:
        """Greedy without a penalty: the argmax of the raw logits (float32 argmax = float64 argmax)."""
        return self.params.greedy and self.params.repetition_penalty == 1.0

    def choose(self, logits: np.ndarray, seen: Iterable[int] = ()) -> int:
        """Pick the next token from one row of logits; `seen` = prompt and generated ids."""
        params = self.params
        row = logits.astype(np.float64, copy=True)
        if params.repetition_penalty != 1.0:
            apply_repetition_penalty(row, seen, params.repetition_penalty)
        if params.greedy:
            return int(np.argmax(row))
        return sample(row, params, self._rng)


def apply_repetition_penalty(row: np.ndarray, seen: Iterable[int], penalty: float) -> None:
    """The CTRL / Hugging Face rule: divide positive logits of seen tokens, multiply negative ones."""
    ids = np.fromiter(set(seen), dtype=np.int64)
    if ids.size == 0:
        return
    values = row[ids]
    row[ids] = np.where(values > 0, values / penalty, values * penalty)


def sample(row: np.ndarray, params: SamplingParams, rng: np.random.Generator) -> int:
    scaled = row / params.temperature
    order = np.argsort(-scaled, kind="stable")
    if params.top_k > 0:
        order = order[: params.top_k]
    top = scaled[order]
    probs = np.exp(top - top[0])
    probs /= probs.sum()
    if params.top_p < 1.0:
        cumulative = np.cumsum(probs)
        keep = int(np.searchsorted(cumulative, params.top_p, side="left")) + 1
        order, probs = order[:keep], probs[:keep]
        probs = probs / probs.sum()
    cumulative = np.cumsum(probs)
    index = int(np.searchsorted(cumulative, rng.random() * cumulative[-1], side="right"))
    return int(order[min(index, len(order) - 1)])
