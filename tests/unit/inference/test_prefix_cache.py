"""The prefix cache on its own: hash-chain keys (a prefix, a model version, a tenant), LRU eviction
within its bound and the room it is given, pinned blocks never evicted; column copies of a slot."""

from __future__ import annotations

import numpy as np
import pytest

from services.inference.engine.kv_cache import KvSpec, SlotBatch
from services.inference.engine.prefix_cache import PrefixCache, block_keys, history_keys, root_key
from services.inference.engine.scheduler import SchedulerSettings

BLOCK = np.zeros((2, 1, 8, 4), dtype=np.float32)  # 256 bytes
SIZE = BLOCK.nbytes


def test_keys_chain_the_whole_prefix_and_stop_two_tokens_before_the_end() -> None:
    root = root_key("v1", "acme")
    ids = list(range(100, 140))  # 40 tokens: blocks end at 8 .. 32 (38 is the last allowed end)
    keys = block_keys(root, ids, 8)
    assert len(keys) == 4 and len(block_keys(root, ids[:34], 8)) == 4 and len(block_keys(root, ids[:33], 8)) == 3
    assert block_keys(root, [*ids, 1, 2, 3], 8)[:4] == keys  # a longer prompt starts with the same keys
    changed = [*ids[:3], 7, *ids[4:]]
    assert not set(block_keys(root, changed, 8)) & set(keys)  # a change in block 0 changes every key after it
    assert block_keys(root, [*ids[:20], 7, *ids[21:]], 8)[:2] == keys[:2]
    assert not set(block_keys(root_key("v1", "globex"), ids, 8)) & set(keys)
    assert not set(block_keys(root_key("v2", "acme"), ids, 8)) & set(keys)
    assert block_keys(root, [1], 8) == [] and block_keys(root, [], 8) == []


def test_a_prompt_caches_at_most_its_first_max_prompt_tokens_and_a_history_every_whole_block() -> None:
    root = root_key("v1", "acme")
    ids = list(range(100, 7100))  # a 7,000-token document
    assert len(block_keys(root, ids, 8)) == 874
    capped = block_keys(root, ids, 8, max_tokens=2048)
    assert len(capped) == 256 and capped == block_keys(root, ids, 8)[:256]
    assert len(block_keys(root, ids[:40], 8, max_tokens=2048)) == 4  # short prompts are not affected
    assert len(block_keys(root, ids, 8, max_tokens=2045)) == 255 and block_keys(root, ids, 8, max_tokens=0) == []
    # a finished turn's prompt + answer: every whole block, the same chain as the next turn's prompt
    assert history_keys(root, ids[:40], 8) == block_keys(root, ids[:42], 8) and len(history_keys(root, ids[:47], 8)) == 5
    assert len(history_keys(root, ids, 8, max_tokens=2048)) == 256


def test_a_kept_block_is_unpinned_and_not_counted_as_a_request_miss() -> None:
    cache = PrefixCache(max_bytes=2 * SIZE)
    assert cache.keep(b"a", BLOCK.copy(), room=10 * SIZE) and cache.keep(b"a", BLOCK.copy(), room=10 * SIZE)
    assert (cache.stats.blocks, cache.stats.misses, cache.pinned_bytes) == (1, 0, 0)
    assert cache.get(b"a") is not None and cache.stats.hits == 0
    assert cache.keep(b"b", BLOCK.copy(), room=10 * SIZE) and cache.keep(b"c", BLOCK.copy(), room=10 * SIZE)
    assert b"a" not in cache and cache.stats.bytes == 2 * SIZE  # least recently used went first
    assert not cache.keep(b"d", BLOCK.copy(), room=SIZE // 2)


def test_least_recently_used_unpinned_blocks_go_first() -> None:
    cache = PrefixCache(max_bytes=3 * SIZE)
    for key in (b"a", b"b", b"c"):
        assert cache.add(key, BLOCK.copy(), room=10 * SIZE)
        cache.unpin(key)
    assert cache.take(b"a") is not None  # a is now the most recently used
    cache.unpin(b"a")
    assert cache.add(b"d", BLOCK.copy(), room=10 * SIZE)
    assert b"b" not in cache and all(k in cache for k in (b"a", b"c", b"d"))
    assert (cache.stats.blocks, cache.stats.bytes, cache.stats.hits, cache.stats.misses) == (3, 3 * SIZE, 1, 4)


def test_pinned_blocks_are_never_evicted_and_the_room_given_bounds_the_cache() -> None:
    cache = PrefixCache(max_bytes=2 * SIZE)
    assert cache.add(b"a", BLOCK.copy(), room=10 * SIZE) and cache.add(b"b", BLOCK.copy(), room=10 * SIZE)
    assert not cache.add(b"c", BLOCK.copy(), room=10 * SIZE)  # both pinned by running sequences
    assert cache.pinned_bytes == 2 * SIZE and not cache.evict_to(0)
    cache.unpin(b"a")
    assert cache.add(b"c", BLOCK.copy(), room=10 * SIZE) and b"a" not in cache
    cache.unpin(b"b")
    cache.unpin(b"c")
    assert not cache.add(b"d", BLOCK.copy(), room=SIZE - 1)  # the KV budget leaves less than a block
    assert cache.add(b"d", BLOCK.copy(), room=SIZE) and cache.stats.bytes == SIZE  # room for one: others go
    assert cache.evict_to(SIZE) and b"d" in cache
    cache.unpin(b"d")
    assert cache.evict_to(0) and cache.stats.blocks == 0 and cache.pinned_bytes == 0


def test_a_block_pinned_twice_stays_until_both_let_go() -> None:
    cache = PrefixCache(max_bytes=SIZE)
    cache.add(b"a", BLOCK.copy(), room=SIZE)
    assert cache.take(b"a") is not None and cache.pinned_bytes == SIZE
    cache.unpin(b"a")
    assert not cache.evict_to(0)
    cache.unpin(b"a")
    assert cache.pinned_bytes == 0 and cache.evict_to(0)
    assert cache.take(b"a") is None


def test_columns_copied_out_of_one_slot_and_into_another_of_another_width() -> None:
    spec = KvSpec(tensors=2, kv_heads=1, head_dim=4, dtype=np.dtype(np.float32))
    small, wide = SlotBatch(spec, rows=2, width=256), SlotBatch(spec, rows=1, width=512)
    slot = small.take("x")
    small._memory.array[:, slot, :, :16, :] = np.arange(2 * 16 * 4, dtype=np.float32).reshape(2, 1, 16, 4)
    block = small.read_columns(slot, 8, 16)
    assert block.shape == (2, 1, 8, 4)
    target = wide.take("y")
    wide.write_columns(target, 8, block)
    np.testing.assert_array_equal(wide.read_columns(target, 8, 16), small.read_columns(slot, 8, 16))
    np.testing.assert_array_equal(wide.read_columns(target, 0, 8), 0)


def test_block_size_must_divide_the_prefill_chunk() -> None:
    with pytest.raises(ValueError, match="prefix_block_tokens must divide prefill_chunk"):
        SchedulerSettings(prefill_chunk=128, prefix_block_tokens=24)


def test_eager_warm_rows_must_not_be_negative() -> None:
    with pytest.raises(ValueError, match="eager_warm_rows must be >= 0"):
        SchedulerSettings(eager_warm_rows=-1)
