"""A non-streaming handler raced against the client's disconnect: a caller who gives up cancels its
generation (billed as cancelled with the tokens made), as a cancelled gRPC call does."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

from starlette.requests import Request

from services.common.errors import Cancelled

T = TypeVar("T")


async def _disconnected(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """`await work`, cancelled (and Cancelled raised) if the client disconnects first. The work runs in
    this task; one watcher task reads the connection and cancels it on a disconnect."""
    task = asyncio.current_task()
    assert task is not None
    disconnected = False

    async def watch() -> None:
        nonlocal disconnected
        await _disconnected(request)
        disconnected = True
        task.cancel()

    watcher = asyncio.ensure_future(watch())
    try:
        return await work
    except asyncio.CancelledError:
        if disconnected and task.uncancel() == 0:  # this watcher's cancel, nobody else's
            raise Cancelled("the client disconnected before the answer was ready") from None
        raise
    finally:
        watcher.cancel()
