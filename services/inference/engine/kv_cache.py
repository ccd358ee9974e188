"""KV-cache storage: one sequence's cache during prefill, and the shared buffer decode steps use.

Layout (GroupQueryAttention, right padding): row b keeps its tokens at columns [0, len_b) of a
buffer of `width` columns; the attention mask row holds len_b + 1 ones, so the step's new key is
written in place at column len_b. The same buffer is bound as past and present (ONNX Runtime's
shared past/present buffer), so a decode step copies no cache at all; attention for a row only
reads its own len_b + 1 columns, which makes a row's result independent of its batch, bit for bit.
Buffers grow in WIDTH_STEP columns and by powers of two in rows, and shrink when rows leave.

On CUDA the buffer lives on the device between steps (an OrtValue); it is only brought back to the
host when a sequence joins or leaves or the buffer grows.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import numpy as np
import onnxruntime as ort

WIDTH_STEP = 128


@dataclass(frozen=True)
class KvSpec:
    """Shape of the cache: `tensors` = 2 x layers arrays of [batch, kv_heads, sequence, head_dim]."""

    tensors: int
    kv_heads: int
    head_dim: int
    dtype: np.dtype

    @property
    def bytes_per_token(self) -> int:
        return self.tensors * self.kv_heads * self.head_dim * self.dtype.itemsize

    def empty(self, batch: int = 1, length: int = 0) -> list[np.ndarray]:
        return [np.zeros((batch, self.kv_heads, length, self.head_dim), self.dtype) for _ in range(self.tensors)]


def width_for(max_len: int) -> int:
    return WIDTH_STEP * ((max_len + 1) // WIDTH_STEP + 1)


class DecodeBatch:
    """Up to `capacity` sequences decoded together; rows are packed at the front of the buffers."""

    def __init__(self, spec: KvSpec, capacity: int, device: str = "cpu") -> None:
        self.spec = spec
        self.capacity = capacity
        self.device = device
        self.keys: list[Hashable] = []
        self.lens = np.zeros(0, dtype=np.int64)
        self.width = 0
        self.buffers: list[np.ndarray] = []  # host copy (the live one on CPU)
        self._values: list[ort.OrtValue] = []  # what the session binds, views of `buffers` on CPU
        self._bound_rows = -1
        self.epoch = 0  # changes whenever the bound cache values change (a binding must be rebuilt)

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def tokens(self) -> int:
        return int(self.lens.sum())

    @property
    def allocated_bytes(self) -> int:
        return sum(b.nbytes for b in self.buffers)

    def add(self, key: Hashable, kv: Sequence[np.ndarray]) -> None:
        """Join with a prefilled cache (arrays of [1, kv_heads, n, head_dim])."""
        if len(self.keys) >= self.capacity:
            raise RuntimeError("decode batch is full")
        self._to_host()
        length = kv[0].shape[2]
        self.keys.append(key)
        self.lens = np.append(self.lens, length)
        self._reshape(len(self.keys), max(self.width, width_for(int(self.lens.max()))))
        row = len(self.keys) - 1
        for buffer, part in zip(self.buffers, kv, strict=True):
            buffer[row, :, :length] = part[0]

    def remove(self, key: Hashable) -> None:
        """Leave at once; the last row moves into the freed slot; memory shrinks with the batch."""
        self._to_host()
        row = self.keys.index(key)
        last = len(self.keys) - 1
        if row != last:
            length = int(self.lens[last])
            for buffer in self.buffers:
                buffer[row, :, :length] = buffer[last, :, :length]
            self.keys[row] = self.keys[last]
            self.lens[row] = self.lens[last]
        self.keys.pop()
        self.lens = self.lens[:last].copy()
        if not self.keys:
            self.buffers, self._values, self.width, self._bound_rows = [], [], 0, -1
            return
        needed = width_for(int(self.lens.max()))
        self._reshape(last, needed if needed < self.width // 2 else self.width)

    def step_inputs(self) -> tuple[np.ndarray, list[ort.OrtValue]]:
        """attention_mask [B, width] (len_b + 1 ones per row) and the cache values to bind as past
        and present for one decode step."""
        rows = len(self.keys)
        if int(self.lens.max()) + 1 > self.width:
            self._to_host()
            self._reshape(rows, width_for(int(self.lens.max())))
        mask = (np.arange(self.width)[None, :] <= self.lens[:, None]).astype(np.int64)
        if self._bound_rows != rows:
            self._bind(rows)
        return mask, self._values

    def advance(self) -> None:
        """The step wrote each row's new column in place."""
        self.lens = self.lens + 1

    def _bind(self, rows: int) -> None:
        if self.device == "cpu":
            self._values = [ort.OrtValue.ortvalue_from_numpy(b[:rows]) for b in self.buffers]
        else:
            self._values = [ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(b[:rows]), self.device, 0)
                            for b in self.buffers]
        self._bound_rows = rows
        self.epoch += 1

    def _to_host(self) -> None:
        """CUDA: bring the live cache back before restructuring (join, leave, growth)."""
        if self.device != "cpu" and self._values:
            for buffer, value in zip(self.buffers, self._values, strict=True):
                buffer[: self._bound_rows] = value.numpy()
        self._bound_rows = -1

    def _reshape(self, rows: int, width: int) -> None:
        """Size buffers to the rows (a power of two) and width; copy only when the size changes."""
        capacity = min(self.capacity, 1 << max(rows - 1, 0).bit_length())
        have_rows = self.buffers[0].shape[0] if self.buffers else 0
        self._bound_rows = -1
        if self.buffers and width == self.width and capacity <= have_rows <= 2 * capacity:
            return
        spec = self.spec
        fresh = [np.zeros((capacity, spec.kv_heads, width, spec.head_dim), spec.dtype) for _ in range(spec.tensors)]
        keep_rows, keep_cols = min(rows, have_rows), min(width, self.width)
        for new, old in zip(fresh, self.buffers, strict=False):
            new[:keep_rows, :, :keep_cols] = old[:keep_rows, :, :keep_cols]
        self.buffers, self.width = fresh, width
