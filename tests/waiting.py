"""Waiting with a deadline: every test that waits for something goes through `wait_until`.

A predicate is polled until it returns something truthy (returned to the caller) or the deadline passes,
which fails the test with a message naming what it waited for. `wait_until_blocking` is the same for
synchronous code (fixtures that start a process). Neither is a sleep used as synchronisation: each
waits for an observable condition, and only as long as the deadline allows.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")


class WaitTimeout(AssertionError):
    """A wait ran past its deadline; the message names what it waited for."""


def _timed_out(what: str, timeout: float, last: object) -> WaitTimeout:
    seen = "" if last is None or last is False else f" (last seen: {last!r})"
    return WaitTimeout(f"timed out after {timeout:g} s waiting for {what}{seen}")


async def wait_until(predicate: Callable[[], T | Awaitable[T]], timeout: float, what: str,
                     interval: float = 0.05) -> T:
    """Poll `predicate` (sync or async) every `interval` s until it returns a truthy value, which is
    returned; after `timeout` s fail with an AssertionError that names `what`."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        value = predicate()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value  # type: ignore[return-value]
        if loop.time() >= deadline:
            raise _timed_out(what, timeout, value)
        await asyncio.sleep(interval)


def wait_until_blocking(predicate: Callable[[], T], timeout: float, what: str, interval: float = 0.05) -> T:
    """`wait_until` for synchronous code."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise _timed_out(what, timeout, value)
        time.sleep(interval)
