"""Size limits count UTF-8 bytes and name the limit; large CPU work leaves the event loop."""

from __future__ import annotations

import asyncio
import threading

import pytest

from services.common.errors import InvalidInput
from services.router import offload
from services.router.input_limits import InputLimits, utf8_size


def test_prompt_bytes_are_utf8_bytes_summed_over_fields() -> None:
    assert utf8_size("abc") == 3 and utf8_size("é日") == 5 and utf8_size("\ud800") == 3
    limits = InputLimits(max_prompt_bytes=10, max_request_bytes=100)
    assert limits.check_prompt([("prompt", "ééééé")]) == 10  # exactly at the limit passes
    with pytest.raises(InvalidInput) as refused:
        limits.check_prompt([("messages[0].content", "abcde"), ("messages[1].content", "ééé")])
    error = refused.value
    assert error.field == "messages[1].content" and error.reason == "PROMPT_TOO_LARGE"
    assert "11 bytes" in error.message and "at most 10 bytes" in error.message and "max_prompt_bytes" in error.message
    assert error.metadata == {"limit_bytes": "10", "size_bytes": "11", "setting": "max_prompt_bytes"}
    limits.check_request(100)
    with pytest.raises(InvalidInput) as too_big:
        limits.check_request(101)
    assert too_big.value.field == "request" and "max_request_bytes" in too_big.value.message
    with pytest.raises(ValueError):
        InputLimits(max_prompt_bytes=0)


async def test_large_work_runs_on_a_worker_thread_and_small_work_inline() -> None:
    loop_thread = threading.get_ident()
    assert await offload.sized(10, threading.get_ident) == loop_thread
    assert await offload.sized(offload.OFF_LOOP_CHARS, threading.get_ident) != loop_thread

    # While a large piece of work runs, the loop keeps serving other callers.
    release, ticked = threading.Event(), asyncio.Event()

    def slow() -> str:
        assert release.wait(10)
        return "done"

    work = asyncio.ensure_future(offload.sized(offload.OFF_LOOP_CHARS, slow))

    async def other_caller() -> None:
        ticked.set()
        release.set()

    await asyncio.wait_for(other_caller(), 5)
    assert ticked.is_set() and await asyncio.wait_for(work, 10) == "done"
