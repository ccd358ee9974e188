"""CPU work whose cost grows with the input (matching blocked terms, hashing a cache key, rendering a
task over a large text) runs on a worker thread once its input is large, so one caller's big prompt
does not stall the event loop, and with it every other caller's stream. Small inputs stay on the loop:
a thread hop costs more than the work.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import ParamSpec, TypeVar

P = ParamSpec("P")
R = TypeVar("R")

# Characters of input above which the work leaves the event loop (~0.1-1 ms of work on the loop).
OFF_LOOP_CHARS = 64 * 1024


async def sized(size: int, work: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
    """`work(*args, **kwargs)`: inline when `size` (characters of input) is small, else on a thread."""
    if size < OFF_LOOP_CHARS:
        return work(*args, **kwargs)
    return await asyncio.to_thread(work, *args, **kwargs)
