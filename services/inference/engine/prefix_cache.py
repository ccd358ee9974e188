"""Prompt KV kept across requests, in blocks keyed by a hash chain, evicted least recently used.

A block is the cache of `block` prompt tokens at a multiple of `block` (a divisor of the prefill
chunk). Its key is a hash chain: key 0 covers the model version, the tenant and the first block's
token ids; key i covers key i - 1 and block i's ids. So a key names the whole prefix up to its block,
a block is found only behind the very same tokens, and tenants never share one (a 128-bit BLAKE2b; a
collision is not a practical concern).

Exactness: a sequence that finds blocks 0..k-1 copies them into its slot and prefills from
k x block on. A prefill call of two or more tokens computes each token's keys and values, and the
last token's logits, bit for bit the same however the prompt is cut into such calls (matmuls
quantize activations per token, attention runs row by row; only a one-token call takes other
kernels), so the cached blocks never leave a one-token call behind them: the last block cached ends
at least two tokens before the prompt does. The engine checks this property on its model when it
starts (`chunking_is_exact`) and otherwise caches whole prefill chunks only, whose hits replay the
cold run's chunk boundaries exactly. Either way a request produces the same tokens with and without
a hit.

Chat answers: a decode step is a one-token call, so its keys and values are not prefill KV bit for bit
(measured on the bundled model: layer 0's keys and values agree, later layers' do not, because the
attention of a one-query call takes MLAS's M = 1 matrix kernel for probabilities x values; GroupQueryAttention
refuses the two-query calls per row that would avoid it once a batch has more than one row), and decoded
columns are never cached. Instead the answer is prefilled from its tokens: while at most
`eager_warm_rows` sequences decode and none waits, into a second slot of the decoding turn as the answer
grows (the scheduler's `Shadow`, 16 tokens a call, its prompt's columns copied in; the decoding slot is
not touched), and once it has finished and the replica idles, in the slot it keeps, from the first block
not yet cached, in calls of whole blocks (`history_keys`). The next turn, whose rendered prompt repeats
the history, then hits every block up to where the template's tokens after the answer diverge. A
request that arrives stops the warm-up call under way (it does not wait for it) and ends the warm-ups
still waiting (their slots go back); it then prefills what the cache lacks, the answer's rest with it.

Admission: a prompt (or history) contributes at most its first `max_prompt_tokens` tokens of blocks
(`prefix_cache_max_prompt_tokens`, 2048 by default: whole conversations and shared system prompts),
so a long one-off document neither evicts many short shared prefixes nor keeps a second copy of its KV
beside its slot while it runs.

Memory: blocks are host arrays counted against the replica's KV-memory budget (together with the
running sequences' reservations) and bounded by `max_bytes`. A block referenced by a running
sequence is pinned and never evicted; the others go least recently used first, when a block is
added or when an admission needs the room.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np

from services.inference.engine.kv_cache import MIN_WIDTH, KvSpec, SlotBatch, width_class
from services.inference.engine.session import ModelRunner

Key = bytes


def root_key(model_version: str, tenant_id: str) -> Key:
    """Where a tenant's chains start for one model version."""
    return hashlib.blake2b(f"{model_version}\x00{tenant_id}".encode(), digest_size=16).digest()


def block_keys(root: Key, ids: list[int], block: int, max_tokens: int | None = None) -> list[Key]:
    """Keys of the prompt's cacheable blocks: the whole blocks that end two or more tokens before it
    does, and within its first `max_tokens` tokens (the admission rule)."""
    return chain_keys(root, ids, block, min(max(0, len(ids) - 2), _limit(ids, max_tokens)) // block)


def history_keys(root: Key, ids: list[int], block: int, max_tokens: int | None = None) -> list[Key]:
    """Keys of every whole block of a finished sequence's prompt and answer (within `max_tokens`)."""
    return chain_keys(root, ids, block, _limit(ids, max_tokens) // block)


def _limit(ids: list[int], max_tokens: int | None) -> int:
    return len(ids) if max_tokens is None else min(len(ids), max_tokens)


def chain_keys(root: Key, ids: list[int], block: int, count: int) -> list[Key]:
    """The hash chain of the first `count` blocks of `ids`."""
    keys: list[Key] = []
    key = root
    for start in range(0, count * block, block):
        chunk = np.asarray(ids[start : start + block], dtype=np.int64).tobytes()
        key = hashlib.blake2b(key + chunk, digest_size=16).digest()
        keys.append(key)
    return keys


@dataclass
class Block:
    data: np.ndarray  # [tensors, kv_heads, block, head_dim]
    pins: int = 0

    @property
    def nbytes(self) -> int:
        return int(self.data.nbytes)


@dataclass
class CacheStats:
    hits: int = 0  # blocks served from the cache
    misses: int = 0  # cacheable blocks that had to be prefilled
    blocks: int = 0
    bytes: int = 0


@dataclass
class PrefixCache:
    """Blocks by key, least recently used first. Owned by the decode thread."""

    max_bytes: int
    stats: CacheStats = field(default_factory=CacheStats)
    _blocks: OrderedDict[Key, Block] = field(default_factory=OrderedDict)
    pinned_bytes: int = 0

    def __contains__(self, key: Key) -> bool:
        return key in self._blocks

    def take(self, key: Key) -> Block | None:
        """The block under `key`, pinned for the caller (release it with `unpin`), or None."""
        found = self._blocks.get(key)
        if found is None:
            return None
        self._blocks.move_to_end(key)
        self._pin(found)
        self.stats.hits += 1
        return found

    def unpin(self, key: Key) -> None:
        found = self._blocks.get(key)
        if found is not None and found.pins > 0:
            found.pins -= 1
            if found.pins == 0:
                self.pinned_bytes -= found.nbytes

    def add(self, key: Key, data: np.ndarray, room: int) -> bool:
        """Keep `data` under `key`, pinned for the caller, within `max_bytes` and `room` bytes (what the
        KV budget leaves beside the running sequences); False when unpinned blocks cannot make room."""
        self.stats.misses += 1
        if key in self._blocks:
            self._pin(self._blocks[key])
            return True
        limit = min(self.max_bytes, room)
        if data.nbytes > limit or not self.evict_to(limit - data.nbytes):
            return False
        block = Block(data)
        self._blocks[key] = block
        self.stats.blocks += 1
        self.stats.bytes += block.nbytes
        self._pin(block)
        return True

    def keep(self, key: Key, data: np.ndarray, room: int) -> bool:
        """Keep `data` under `key`, unpinned (a block warmed from a finished sequence's answer), within
        `max_bytes` and `room`; False when unpinned blocks cannot make room."""
        if key in self._blocks:
            return True
        limit = min(self.max_bytes, room)
        if data.nbytes > limit or not self.evict_to(limit - data.nbytes):
            return False
        self._blocks[key] = Block(data)
        self.stats.blocks += 1
        self.stats.bytes += int(data.nbytes)
        return True

    def get(self, key: Key) -> Block | None:
        """The block under `key`, neither pinned nor counted as a hit (the warm-up reads it)."""
        return self._blocks.get(key)

    def evict_to(self, target: int) -> bool:
        """Drop unpinned blocks, least recently used first, until at most `target` bytes are held."""
        if self.stats.bytes <= target:
            return True
        for key in [k for k, b in self._blocks.items() if b.pins == 0]:
            block = self._blocks.pop(key)
            self.stats.blocks -= 1
            self.stats.bytes -= block.nbytes
            if self.stats.bytes <= target:
                return True
        return self.stats.bytes <= target

    def _pin(self, block: Block) -> None:
        if block.pins == 0:
            self.pinned_bytes += block.nbytes
        block.pins += 1


def chunking_is_exact(runner: ModelRunner, spec: KvSpec, block: int) -> bool:
    """Whether this model, on this machine, computes a prompt's cache and last logits bit for bit the
    same whole and cut at block boundaries into calls of two or more tokens."""
    tokens = [(7 * i + 11) % 997 + 100 for i in range(4 * block + 5)]
    width = width_class(len(tokens), MIN_WIDTH * 64)

    def run(cuts: list[int]) -> tuple[np.ndarray, np.ndarray]:
        batch = SlotBatch(spec, 1, width, runner.device)
        slot = batch.take(0)
        start, logits = 0, np.empty(0)
        for stop in [*cuts, len(tokens)]:
            mask = np.zeros((1, width), dtype=np.int64)
            mask[0, :stop] = 1
            logits = runner.prefill(np.array([tokens[start:stop]], dtype=np.int64), mask, batch.slot_view(slot))
            start = stop
        return batch.read_columns(slot, 0, len(tokens)), logits

    whole_cache, whole_logits = run([])
    for cuts in ([block], [block, block + 2], [2 * block, 3 * block, 4 * block]):
        cache, logits = run(cuts)
        if not (np.array_equal(cache, whole_cache) and np.array_equal(logits, whole_logits)):
            return False
    return True
