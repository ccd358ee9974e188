"""`n` generations of one request running at once through the gateway, their items merged in arrival order.

Each stream is pumped by a task of its own (copying the request's context: trace and request ids).
`started()` waits until every stream produced its first item, so a refusal (auth, limits, budget,
validation) is still an HTTP status rather than an event after the first byte. `aclose()` cancels
the pumps and closes every gateway iterator, which settles those requests as cancelled.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Generic, TypeVar

T = TypeVar("T")
_END = object()


class Fanout(Generic[T]):
    def __init__(self, streams: list[AsyncIterator[T]]) -> None:
        self._queue: asyncio.Queue[tuple[int, object]] = asyncio.Queue()
        self._first = [asyncio.get_running_loop().create_future() for _ in streams]
        self._open = len(streams)
        self._tasks = [asyncio.create_task(self._pump(i, s)) for i, s in enumerate(streams)]

    async def _pump(self, index: int, stream: AsyncIterator[T]) -> None:
        first = self._first[index]
        try:
            async for item in stream:
                if not first.done():
                    first.set_result(None)
                self._queue.put_nowait((index, item))
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._queue.put_nowait((index, exc))
            if not first.done():
                first.set_result(exc)
            return
        finally:
            aclose = getattr(stream, "aclose", None)
            if aclose is not None:
                await asyncio.shield(aclose())
            if not first.done():
                first.set_result(None)
        self._queue.put_nowait((index, _END))

    async def started(self) -> None:
        """Wait until each stream produced its first item; the first failure among them is raised."""
        for first in asyncio.as_completed(self._first):
            result = await first
            if isinstance(result, BaseException):
                await self.aclose()
                raise result

    def __aiter__(self) -> AsyncIterator[tuple[int, T]]:
        return self._items()

    async def _items(self) -> AsyncIterator[tuple[int, T]]:
        while self._open:
            index, item = await self._queue.get()
            if item is _END:
                self._open -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield index, item  # type: ignore[misc]

    async def aclose(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
