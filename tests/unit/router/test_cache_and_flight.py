"""The response cache keys on the whole request and honours its bounds; single-flight runs one generation."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from services.common.generation import FinishReason
from services.router.cache import CachedAnswer, ResponseCache, cache_key
from services.router.single_flight import SingleFlight
from services.router.types import Message, Role, Sampling

HI = (Message(Role.USER, "Hello  World"),)


def answer(text: str = "ok") -> CachedAnswer:
    return CachedAnswer(text, FinishReason.STOP, 3, 1, "m", "v1")


def test_key_changes_with_every_part_of_the_request() -> None:
    def key(*args: object, scope: str | None = "acme") -> str:
        return cache_key(*args, scope=scope)  # type: ignore[arg-type]

    base = key("m", "v1", Sampling(temperature=0, max_tokens=5), "", HI, False)
    variants = [
        key("m2", "v1", Sampling(temperature=0, max_tokens=5), "", HI, False),
        key("m", "v2", Sampling(temperature=0, max_tokens=5), "", HI, False),
        key("m", "v1", Sampling(temperature=0, max_tokens=6), "", HI, False),
        key("m", "v1", Sampling(temperature=0, max_tokens=5, stop=("x",)), "", HI, False),
        key("m", "v1", Sampling(temperature=0, max_tokens=5), "", (Message(Role.USER, "hello world"),), False),
        key("m", "v1", Sampling(temperature=0, max_tokens=5), "", (Message(Role.SYSTEM, "Hello  World"),), False),
        # Another tenant, and the shared (tenant-free) scope, never meet this tenant's entries.
        key("m", "v1", Sampling(temperature=0, max_tokens=5), "", HI, False, scope="globex"),
        key("m", "v1", Sampling(temperature=0, max_tokens=5), "", HI, False, scope=None),
        key("m", "v1", Sampling(temperature=0, max_tokens=5), "", HI, False, scope=""),
    ]
    assert len({base, *variants}) == 10
    # Normalisation is opt-in: with it, case and whitespace no longer matter.
    assert key("m", "v1", Sampling(), "", HI, False, True) == key(
        "m", "v1", Sampling(), "", (Message(Role.USER, "hello world"),), False, True)
    # A normalised key never equals the plain key of the normalised text.
    assert key("m", "v1", Sampling(), "", HI, False, True) != key(
        "m", "v1", Sampling(), "", (Message(Role.USER, "hello world"),), False)


def test_lru_bound_and_ttl() -> None:
    now = [0.0]
    cache = ResponseCache(max_entries=2, ttl_s=10, clock=lambda: now[0])
    cache.put("a", answer())
    cache.put("b", answer())
    assert cache.get("a") is not None  # a is now most recent
    cache.put("c", answer())
    assert cache.get("b") is None and cache.get("a") is not None and cache.get("c") is not None
    now[0] = 11
    assert cache.get("a") is None
    small = ResponseCache(max_entries=100, max_bytes=300)
    small.put("x", answer("x" * 100))
    small.put("y", answer("y" * 100))
    assert len(small) == 1 and small.get("y") is not None


def test_deterministic_means_greedy_or_seeded() -> None:
    assert Sampling().deterministic and Sampling(temperature=0).deterministic
    assert Sampling(temperature=0.7, seed=1).deterministic and not Sampling(temperature=0.7).deterministic


async def test_concurrent_identical_requests_share_one_generation() -> None:
    flights: SingleFlight[str] = SingleFlight()
    gate = asyncio.Event()
    runs = 0

    async def generate() -> AsyncIterator[str]:
        nonlocal runs
        runs += 1
        yield "a"
        await gate.wait()
        yield "b"

    streams = [flights.join("k", generate) for _ in range(100)]
    assert [leader for _, leader in streams].count(True) == 1

    async def drain(stream: AsyncIterator[str]) -> list[str]:
        return [item async for item in stream]

    tasks = [asyncio.create_task(drain(s)) for s, _ in streams]
    await asyncio.sleep(0)
    late, _ = flights.join("k", generate)  # joins midway, still sees the whole stream
    tasks.append(asyncio.create_task(drain(late)))
    gate.set()
    results = await asyncio.gather(*tasks)
    assert runs == 1 and all(r == ["a", "b"] for r in results)
    assert not flights.in_flight("k")


async def test_generation_is_cancelled_when_every_caller_left() -> None:
    flights: SingleFlight[str] = SingleFlight()
    cancelled = asyncio.Event()

    async def generate() -> AsyncIterator[str]:
        try:
            yield "a"
            await asyncio.Event().wait()
            yield "never"
        finally:
            cancelled.set()

    stream, _ = flights.join("k", generate)
    assert await stream.__anext__() == "a"
    await stream.aclose()  # type: ignore[attr-defined]
    await asyncio.wait_for(cancelled.wait(), 5)
