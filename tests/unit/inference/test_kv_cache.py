"""The KV-cache slots and budget on their own: slot bookkeeping, memory that follows the tokens
written (resident size read from /proc), width classes, the budget's default and its checks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from services.common.errors import InvalidInput
from services.inference.engine.kv_budget import default_kv_budget, fit_max_tokens
from services.inference.engine.kv_cache import KvSpec, SlotBatch, width_class

SPEC = KvSpec(tensors=4, kv_heads=2, head_dim=64, dtype=np.dtype(np.float32))  # 2 KiB per token
MIB = 1 << 20


def rss_anon() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no RssAnon in /proc/self/status")


def write(batch: SlotBatch, slot: int, length: int, value: float) -> None:
    """What a prefill chunk does: columns [0, length) of the slot in every tensor."""
    for pointer in batch.slot_view(slot).pointers:
        row = np.ctypeslib.as_array((np.ctypeslib.ctypes.c_float * (SPEC.kv_heads * batch.width * SPEC.head_dim))
                                    .from_address(pointer)).reshape(SPEC.kv_heads, batch.width, SPEC.head_dim)
        row[:, :length] = value


def test_slots_keep_their_lengths_and_the_bound_rows_follow_the_highest_used_slot() -> None:
    batch = SlotBatch(SPEC, rows=4, width=256)
    a, b, c = batch.take("a"), batch.take("b"), batch.take("c")
    assert (a, b, c) == (0, 1, 2) and batch.bound == 3
    batch.prefilled(a, 5, done=True)
    batch.prefilled(b, 3, done=False)  # still prefilling: a dummy row in decode steps
    batch.prefilled(c, 7, done=True)
    assert batch.step_mask().sum(axis=1).tolist() == [6, 4, 8]
    batch.advance()
    assert batch.lens.tolist() == [6, 3, 8, 0] and batch.tokens == 17
    epoch = batch.epoch
    batch.release(b)  # a hole: slot 2 stays where it is, so the bound rows do not change
    assert batch.bound == 3 and batch.epoch == epoch and len(batch) == 2
    assert batch.take("d") == 1
    batch.release(c)
    batch.release(1)
    assert batch.bound == 1 and batch.epoch != epoch and batch.keys == ["a", None, None, None]


def test_memory_follows_the_tokens_written_not_rows_times_width() -> None:
    batch = SlotBatch(SPEC, rows=16, width=8192)  # 1 GiB of address space
    assert batch.reserved_bytes == 16 * SPEC.bytes_for(8192)
    before = rss_anon()
    long_slot = batch.take("long")
    write(batch, long_slot, 4000, 1.0)
    for i in range(15):
        write(batch, batch.take(f"short{i}"), 100, 2.0)
    written = SPEC.bytes_for(4000 + 15 * 100)  # 11 MiB
    grown = rss_anon() - before
    assert written * 0.9 <= grown <= written * 1.3 + 2 * MIB, (grown, written)
    batch.release(long_slot)
    assert rss_anon() - before <= SPEC.bytes_for(15 * 100) * 1.3 + 2 * MIB
    view = batch.slot_view(1)
    row = np.ctypeslib.as_array((np.ctypeslib.ctypes.c_float * 4).from_address(view.pointers[0]))
    assert row.tolist() == [2.0] * 4  # the other slots keep their cache


def test_a_sequence_goes_to_the_width_class_of_its_prompt_plus_max_tokens() -> None:
    assert [width_class(n, 8192) for n in (1, 256, 257, 1000, 7032, 8192)] == [256, 256, 512, 1024, 8192, 8192]
    assert width_class(9000, 8192) == 8192


def test_default_budget_is_a_full_batch_capped_at_a_quarter_of_memory() -> None:
    full = SPEC.bytes_for(8192)  # 16 MiB
    assert default_kv_budget(SPEC, 8192, 16, memory=64 << 30) == 16 * full
    assert default_kv_budget(SPEC, 8192, 16, memory=128 * MIB) == 32 * MIB
    assert default_kv_budget(SPEC, 8192, 16, memory=16 * MIB) == full  # one full sequence at least


def test_a_request_that_can_never_fit_the_budget_names_the_numbers() -> None:
    budget = SPEC.bytes_for(1000)
    assert fit_max_tokens(900, 100, True, SPEC, budget) == 100
    with pytest.raises(InvalidInput, match=r"prompt \(900 tokens\) \+ max_tokens \(101\) needs 2\.0 MiB .* "
                                           r"KV budget of 2\.0 MiB \(1000 tokens at 2048 bytes each\)") as err:
        fit_max_tokens(900, 101, True, SPEC, budget)
    assert err.value.field == "sampling.max_tokens"
    assert fit_max_tokens(900, 256, False, SPEC, budget) == 100  # an unasked default shrinks to what fits
    with pytest.raises(InvalidInput, match=r"prompt \(1000 tokens\)") as err:
        fit_max_tokens(1000, 256, False, SPEC, budget)
    assert err.value.field == "prompt"
