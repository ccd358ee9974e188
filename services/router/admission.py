"""Admission by traffic class: at most `capacity` generations run at once through this router; when
it is full, waiting CORE requests go before INTERACTIVE before BATCH (FIFO within a class)."""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from services.router.types import TrafficClass


class PriorityGate:
    def __init__(self, capacity: int) -> None:
        self._capacity = capacity
        self._in_use = 0
        self._waiters: list[tuple[int, int, asyncio.Future[None]]] = []
        self._seq = itertools.count()

    @property
    def in_use(self) -> int:
        return self._in_use

    @property
    def waiting(self) -> int:
        return sum(1 for _, _, f in self._waiters if not f.done())

    def try_acquire(self) -> bool:
        """Take a slot only if one is free now and nobody waits for one."""
        if self._in_use < self._capacity and not self.waiting:
            self._in_use += 1
            return True
        return False

    async def acquire(self, traffic_class: TrafficClass) -> None:
        if self._in_use < self._capacity and not self.waiting:
            self._in_use += 1
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._waiters, (int(traffic_class), next(self._seq), future))
        try:
            await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                self.release()  # granted just as we were cancelled: pass it on
            raise

    def release(self) -> None:
        self._in_use -= 1
        while self._waiters and self._in_use < self._capacity:
            _, _, future = heapq.heappop(self._waiters)
            if not future.done():
                self._in_use += 1
                future.set_result(None)

    @asynccontextmanager
    async def slot(self, traffic_class: TrafficClass) -> AsyncIterator[None]:
        await self.acquire(traffic_class)
        try:
            yield
        finally:
            self.release()
