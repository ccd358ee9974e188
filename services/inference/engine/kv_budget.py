"""The KV-memory budget of a replica: its default from the machine, and what a request may reserve.

Each sequence reserves the cache of prompt + max_tokens tokens when it is admitted to the batch and
frees it when it leaves; the scheduler admits a sequence only while the reservations fit the budget
(the others wait in the bounded queue). A request that could never fit is refused before it queues.
"""

from __future__ import annotations

import os
from pathlib import Path

from services.common.errors import InvalidInput
from services.inference.engine.kv_cache import KvSpec

MIB = 1 << 20
# Share of the machine's memory the default budget may take: the model, the runtime and the other
# services of the mesh need the rest.
DEFAULT_MEMORY_SHARE = 0.25


def machine_memory_bytes() -> int:
    """Physical memory, or the cgroup's memory limit when that is lower (a container)."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for limit in (Path("/sys/fs/cgroup/memory.max"), Path("/sys/fs/cgroup/memory/memory.limit_in_bytes")):
        try:
            text = limit.read_text().strip()
        except OSError:
            continue
        if text.isdigit():
            total = min(total, int(text))
    return total


def default_kv_budget(spec: KvSpec, context_window: int, max_batch_size: int, memory: int | None = None) -> int:
    """What a full batch of full-context sequences needs, capped at a quarter of the machine's memory
    (and never below one full-context sequence, so any valid request can run)."""
    memory = machine_memory_bytes() if memory is None else memory
    full = spec.bytes_for(context_window)
    return max(full, min(max_batch_size * full, int(memory * DEFAULT_MEMORY_SHARE)))


def budget_tokens(spec: KvSpec, budget: int) -> int:
    return budget // spec.bytes_per_token


def fit_max_tokens(prompt_tokens: int, max_tokens: int, asked: bool, spec: KvSpec, budget: int) -> int:
    """`max_tokens` if prompt + max_tokens fits the budget; an unasked default shrinks to what fits;
    otherwise an InvalidInput naming the numbers."""
    room = budget_tokens(spec, budget) - prompt_tokens
    if prompt_tokens + max_tokens <= budget_tokens(spec, budget):
        return max_tokens
    if not asked and room >= 1:
        return room
    need = spec.bytes_for(prompt_tokens + max_tokens)
    raise InvalidInput(
        f"prompt ({prompt_tokens} tokens) + max_tokens ({max_tokens}) needs {need / MIB:.1f} MiB of KV cache, "
        f"more than this replica's KV budget of {budget / MIB:.1f} MiB ({budget_tokens(spec, budget)} tokens "
        f"at {spec.bytes_per_token} bytes each); shorten the prompt or lower max_tokens",
        field="sampling.max_tokens" if asked else "prompt")
