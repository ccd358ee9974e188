"""Admission by traffic class: at most `capacity` generations run at once through this router; when
it is full, waiting CORE requests go before INTERACTIVE before BATCH (FIFO within a class).

The wait is bounded: at most `max_waiting` requests queue. A request arriving at a full queue takes
the place of the newest waiter of the lowest class below its own (that waiter is refused); when there
is none it is refused itself. A refusal is QueueFull (RESOURCE_EXHAUSTED, reason QUEUE_FULL) with a
retry delay of `retry_after_s`, raised before the request waited at all, or the moment it was pushed out.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from services.common.errors import QueueFull
from services.common.generation import TrafficClass


class PriorityGate:
    def __init__(self, capacity: int, max_waiting: int = 1024, retry_after_s: float = 1.0) -> None:
        self._capacity = capacity
        self._max_waiting = max_waiting
        self._retry_after_s = retry_after_s
        self._in_use = 0
        # (class, arrival, future): the heap's head is the next to be admitted. Every entry is live:
        # a waiter that leaves removes its own entry.
        self._waiters: list[tuple[int, int, asyncio.Future[None]]] = []
        self._seq = itertools.count()

    @property
    def in_use(self) -> int:
        return self._in_use

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    def try_acquire(self) -> bool:
        """Take a slot only if one is free now and nobody waits for one."""
        if self._in_use < self._capacity and not self._waiters:
            self._in_use += 1
            return True
        return False

    def check_room(self, traffic_class: TrafficClass) -> None:
        """Raises QueueFull when a request of this class would be refused now (called before work is
        spent on the request, e.g. a budget hold)."""
        if self._in_use < self._capacity and not self._waiters:
            return
        if len(self._waiters) >= self._max_waiting and self._lowest_below(int(traffic_class)) is None:
            raise self._full(traffic_class)

    async def acquire(self, traffic_class: TrafficClass) -> None:
        if self._in_use < self._capacity and not self._waiters:
            self._in_use += 1
            return
        rank = int(traffic_class)
        if len(self._waiters) >= self._max_waiting:
            lowest = self._lowest_below(rank)
            if lowest is None:
                raise self._full(traffic_class)
            entry = self._waiters[lowest]
            self._remove(lowest)
            entry[2].set_exception(self._full(TrafficClass(entry[0]), pushed_out=True))
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (rank, next(self._seq), future)
        heapq.heappush(self._waiters, entry)
        try:
            await future
        except BaseException:
            if future.cancelled() or not future.done():
                self._discard(entry)  # gave up while waiting (a refused waiter was removed already)
            elif future.exception() is None:
                self.release()  # granted just as we were cancelled: pass it on
            raise

    def release(self) -> None:
        self._in_use -= 1
        while self._waiters and self._in_use < self._capacity:
            _, _, future = heapq.heappop(self._waiters)
            self._in_use += 1
            future.set_result(None)

    @asynccontextmanager
    async def slot(self, traffic_class: TrafficClass) -> AsyncIterator[None]:
        await self.acquire(traffic_class)
        try:
            yield
        finally:
            self.release()

    def _lowest_below(self, rank: int) -> int | None:
        """Index of the newest waiter of the lowest class ranked after `rank`, if any."""
        best: int | None = None
        for index, (other, seq, _) in enumerate(self._waiters):
            if other > rank and (best is None or (other, seq) > self._waiters[best][:2]):
                best = index
        return best

    def _remove(self, index: int) -> None:
        last = self._waiters.pop()
        if index < len(self._waiters):
            self._waiters[index] = last
            heapq.heapify(self._waiters)

    def _discard(self, entry: tuple[int, int, asyncio.Future[None]]) -> None:
        for index, other in enumerate(self._waiters):
            if other is entry:
                self._remove(index)
                return

    def _full(self, traffic_class: TrafficClass, pushed_out: bool = False) -> QueueFull:
        why = ("a request of a higher traffic class took its place in the full queue" if pushed_out
               else f"{self._max_waiting} requests already wait and none ranks below {traffic_class.name}")
        return QueueFull(
            f"the router is at its limit of {self._capacity} concurrent generations and its wait queue is full"
            f" ({why}); retry after {self._retry_after_s:g} s",
            retry_after_s=self._retry_after_s,
            metadata={"max_queued": str(self._max_waiting), "max_concurrent": str(self._capacity)},
        )
