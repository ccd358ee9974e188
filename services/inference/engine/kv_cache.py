"""KV-cache storage: slot batches whose memory follows the tokens written, not rows x the longest row.

Layout (GroupQueryAttention, right padding, one buffer bound as both past and present): a SlotBatch
holds `rows` slots of one fixed `width`; each of the 2 x layers tensors is [rows, kv_heads, width,
head_dim]. Slot b keeps its tokens at columns [0, len_b) and the step's mask row holds len_b + 1
ones, so the new key is written in place at column len_b. A sequence takes a slot when it is
admitted, its prompt chunks are prefilled straight into that slot (a batch-1 call bound to the slot
alone) and it decodes there until it leaves: its cache is never copied, concatenated or regrown.

Memory: on the CPU a batch's buffers are one anonymous memory map without transparent huge pages,
so the kernel commits a page only when a token is written into it. A batch's resident size is the
sum of its slots' lengths (rounded up to a page per slot, head and tensor), whatever its rows and
width; a freed slot's pages go back to the kernel at once (MADV_DONTNEED). Widths come in classes
(powers of two from MIN_WIDTH up to the context window): a sequence goes to a batch of the class of
its prompt + max_tokens, so short rows are not attended at a long row's width.

Slots that are free or still prefilling ride along in a decode step as dummy rows: their logits are
ignored, and the column they write lies at their length, where the next prompt chunk writes anyway.
Attention for a row reads only its own len_b + 1 columns, so a row's tokens never depend on the
batch, bit for bit.

On CUDA the buffers are device memory of the batch's full size (allocated once per batch); steps
bind device pointers into them.
"""

from __future__ import annotations

import mmap
from collections.abc import Hashable
from dataclasses import dataclass

import numpy as np
import onnxruntime as ort

MIN_WIDTH = 256
PAGE = mmap.PAGESIZE


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

    def bytes_for(self, tokens: int) -> int:
        return tokens * self.bytes_per_token


def width_class(tokens: int, max_width: int) -> int:
    """Columns of the batch a sequence of at most `tokens` cached tokens goes to."""
    width = MIN_WIDTH
    while width < tokens:
        width *= 2
    return min(width, max_width)


@dataclass(frozen=True)
class SlotView:
    """Where a run of slots lives: one address per tensor, and the shape bound at each."""

    device: str
    pointers: tuple[int, ...]
    shape: tuple[int, int, int, int]
    dtype: np.dtype


class SlotBatch:
    """`rows` slots decoded together; slots [0, bound) take part in each decode step."""

    def __init__(self, spec: KvSpec, rows: int, width: int, device: str = "cpu", min_rows: int = 1) -> None:
        self.spec = spec
        self.rows = rows
        # a step takes at least this many rows (free slots as dummy rows): a model whose one-row calls
        # take other kernels (`Scheduler`'s min_decode_rows) never decodes a row alone
        self.min_rows = max(1, min(min_rows, rows))
        self.width = width
        self.device = device
        self.keys: list[Hashable | None] = [None] * rows
        self.lens = np.zeros(rows, dtype=np.int64)
        self.decoding = np.zeros(rows, dtype=bool)
        self.bound = 0
        self.epoch = 0  # changes whenever `bound` changes (a decode binding must be rebuilt)
        self.row_bytes = spec.kv_heads * width * spec.head_dim * spec.dtype.itemsize
        self._memory = _HostMemory(spec, rows, width) if device == "cpu" else _DeviceMemory(spec, rows, width, device)

    def __len__(self) -> int:
        return sum(key is not None for key in self.keys)

    @property
    def has_room(self) -> bool:
        return None in self.keys

    @property
    def tokens(self) -> int:
        return int(self.lens.sum())

    @property
    def reserved_bytes(self) -> int:
        """Address space of the batch (on the CPU only the written pages are resident)."""
        return self.spec.tensors * self.rows * self.row_bytes

    def take(self, key: Hashable) -> int:
        """A free slot for `key` (the lowest one, so the bound rows stay few)."""
        slot = self.keys.index(None)
        self.keys[slot] = key
        self.lens[slot] = 0
        self.decoding[slot] = False
        self._rebound()
        return slot

    def hand_over(self, slot: int, key: Hashable) -> None:
        """The slot, with what its columns hold, now belongs to `key` (a chat turn takes over its
        conversation's slot)."""
        self.keys[slot] = key

    def copy_columns(self, slot: int, into: SlotBatch, into_slot: int, start: int, stop: int) -> None:
        """Copy the slot's columns [start, stop) to the same columns of `into_slot` in `into` (a wider
        batch of the same spec), without an intermediate array."""
        into._memory.take_columns(into_slot, self._memory, slot, start, stop)

    def release(self, slot: int) -> None:
        """Free the slot at once; its memory goes back to the kernel."""
        self.keys[slot] = None
        self.lens[slot] = 0
        self.decoding[slot] = False
        self._memory.forget(slot)
        self._rebound()

    def prefilled(self, slot: int, length: int, done: bool) -> None:
        self.lens[slot] = length
        self.decoding[slot] = done

    def read_columns(self, slot: int, start: int, stop: int) -> np.ndarray:
        """A copy of the slot's columns [start, stop): [tensors, kv_heads, stop - start, head_dim]."""
        return self._memory.read(slot, start, stop)

    def write_columns(self, slot: int, start: int, data: np.ndarray) -> None:
        """Write `data` (as `read_columns` returns it) into the slot's columns from `start` on."""
        self._memory.write(slot, start, data)

    def slot_view(self, slot: int) -> SlotView:
        return self._view(slot, 1)

    def step_view(self) -> SlotView:
        return self._view(0, self.bound)

    def step_mask(self) -> np.ndarray:
        """attention_mask [bound, width]: len_b + 1 ones per row."""
        return (np.arange(self.width)[None, :] <= self.lens[: self.bound, None]).astype(np.int64)

    def advance(self) -> None:
        """The step wrote each decoding row's new column in place."""
        self.lens[: self.bound] += self.decoding[: self.bound]

    def _view(self, first: int, count: int) -> SlotView:
        pointers = tuple(self._memory.address(t, first) for t in range(self.spec.tensors))
        shape = (count, self.spec.kv_heads, self.width, self.spec.head_dim)
        return SlotView(self.device, pointers, shape, self.spec.dtype)

    def _rebound(self) -> None:
        used = [i for i, key in enumerate(self.keys) if key is not None]
        bound = max(used[-1] + 1, self.min_rows) if used else 0
        if bound != self.bound:
            self.bound = bound
            self.epoch += 1


class _HostMemory:
    """One anonymous map for every tensor of a batch: [tensors, rows, kv_heads, width, head_dim]."""

    def __init__(self, spec: KvSpec, rows: int, width: int) -> None:
        self._row_bytes = spec.kv_heads * width * spec.head_dim * spec.dtype.itemsize
        self._rows = rows
        self._tensors = spec.tensors
        # private (a shared anonymous map is shmem: MADV_DONTNEED would not free it), and not charged
        # against overcommit up front: only written pages are ever used
        flags = mmap.MAP_PRIVATE | getattr(mmap, "MAP_NORESERVE", 0)
        self._map = mmap.mmap(-1, spec.tensors * rows * self._row_bytes, flags=flags)
        if hasattr(mmap, "MADV_NOHUGEPAGE"):  # a huge page would commit 2 MiB for one token's write
            self._map.madvise(mmap.MADV_NOHUGEPAGE)
        self.array = np.frombuffer(self._map, dtype=spec.dtype).reshape(
            spec.tensors, rows, spec.kv_heads, width, spec.head_dim)
        self._base = self.array.ctypes.data

    def address(self, tensor: int, slot: int) -> int:
        return self._base + (tensor * self._rows + slot) * self._row_bytes

    def read(self, slot: int, start: int, stop: int) -> np.ndarray:
        return self.array[:, slot, :, start:stop, :].copy()

    def write(self, slot: int, start: int, data: np.ndarray) -> None:
        self.array[:, slot, :, start : start + data.shape[2], :] = data

    def take_columns(self, slot: int, source: _HostMemory | _DeviceMemory, source_slot: int, start: int,
                     stop: int) -> None:
        if not isinstance(source, _HostMemory):
            raise NotImplementedError("columns of device memory are not copied (no prefix cache on CUDA)")
        self.array[:, slot, :, start:stop, :] = source.array[:, source_slot, :, start:stop, :]

    def forget(self, slot: int) -> None:
        """Hand the slot's pages back (stale bytes at unaligned edges are never read)."""
        if not hasattr(self._map, "madvise"):
            return
        for tensor in range(self._tensors):
            start = (tensor * self._rows + slot) * self._row_bytes
            first, last = -(-start // PAGE) * PAGE, (start + self._row_bytes) // PAGE * PAGE
            if last > first:
                self._map.madvise(mmap.MADV_DONTNEED, first, last - first)


class _DeviceMemory:
    def __init__(self, spec: KvSpec, rows: int, width: int, device: str) -> None:
        self._row_bytes = spec.kv_heads * width * spec.head_dim * spec.dtype.itemsize
        shape = (rows, spec.kv_heads, width, spec.head_dim)
        # from host zeros (untouched calloc pages: no host memory) so free rows read zeros, not garbage
        self._values = [ort.OrtValue.ortvalue_from_numpy(np.zeros(shape, spec.dtype), device, 0)
                        for _ in range(spec.tensors)]
        self._rows = rows

    def address(self, tensor: int, slot: int) -> int:
        return int(self._values[tensor].data_ptr()) + slot * self._row_bytes

    def read(self, slot: int, start: int, stop: int) -> np.ndarray:
        raise NotImplementedError("columns of device memory are not copied (no prefix cache on CUDA)")

    def write(self, slot: int, start: int, data: np.ndarray) -> None:
        raise NotImplementedError("columns of device memory are not copied (no prefix cache on CUDA)")

    def take_columns(self, slot: int, source: _HostMemory | _DeviceMemory, source_slot: int, start: int,
                     stop: int) -> None:
        raise NotImplementedError("columns of device memory are not copied (no prefix cache on CUDA)")

    def forget(self, slot: int) -> None:
        pass  # a slot's stale columns are never read: attention stops at each row's length
