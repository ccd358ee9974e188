"""Single-flight: identical concurrent requests share one generation.

The first caller for a key starts the generation as a task owned by the flight (not by the caller);
every caller — including ones joining midway — reads the whole stream from the start. When the last
caller leaves before the end, the generation is cancelled, so nobody keeps a model busy for nothing.
`on_complete` sees every item of a generation that ended well, in the same step that retires the flight,
so a cache filled there never leaves a moment when a key is neither in flight nor cached.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

T = TypeVar("T")


@dataclass
class Flight(Generic[T]):
    items: list[T] = field(default_factory=list)
    done: bool = False
    error: BaseException | None = None
    subscribers: int = 0
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None


class SingleFlight(Generic[T]):
    def __init__(self) -> None:
        self._flights: dict[str, Flight[T]] = {}
        self.generations = 0

    def in_flight(self, key: str) -> bool:
        return key in self._flights

    def join(
        self, key: str, start: Callable[[], AsyncIterator[T]],
        on_complete: Callable[[list[T]], None] | None = None,
    ) -> tuple[AsyncIterator[T], bool]:
        """A stream of the flight for `key` (started with `start()` if none runs) and whether this caller led it."""
        flight = self._flights.get(key)
        leader = flight is None
        if flight is None:
            flight = Flight()
            self._flights[key] = flight
            self.generations += 1
            flight.task = asyncio.create_task(self._run(key, flight, start(), on_complete))
        flight.subscribers += 1
        return self._follow(key, flight), leader

    async def _run(
        self, key: str, flight: Flight[T], source: AsyncIterator[T], on_complete: Callable[[list[T]], None] | None
    ) -> None:
        try:
            async for item in source:
                flight.items.append(item)
                flight.changed.set()
            if on_complete is not None:
                on_complete(flight.items)
        except asyncio.CancelledError:
            flight.error = asyncio.CancelledError()
        except BaseException as exc:  # delivered to every subscriber, which re-raises it
            flight.error = exc
        finally:
            flight.done = True
            flight.changed.set()
            if self._flights.get(key) is flight:
                del self._flights[key]

    async def _follow(self, key: str, flight: Flight[T]) -> AsyncIterator[T]:
        index = 0
        try:
            while True:
                while index < len(flight.items):
                    yield flight.items[index]
                    index += 1
                if flight.done:
                    if flight.error is not None:
                        raise flight.error
                    return
                flight.changed.clear()
                if index < len(flight.items) or flight.done:
                    continue
                await flight.changed.wait()
        finally:
            flight.subscribers -= 1
            if flight.subscribers == 0 and not flight.done and flight.task is not None:
                flight.task.cancel()
                if self._flights.get(key) is flight:
                    del self._flights[key]
