"""Per-key token buckets: requests/min and tokens/min.

Each bucket holds at most one minute's allowance and refills continuously at limit/60 per second.
A request takes 1 request and `prompt + max_tokens` tokens up front (`admit`); when it ends,
`settle` gives back what it did not use (or takes the overshoot). A refusal is `RateLimited` with the
delay after which the same request would pass, carried to the caller as google.rpc.RetryInfo.

`RateLimiterBackend` is the storage interface; `InMemoryBuckets` is the embedded default.
`services.router.limits.redis_buckets.RedisBuckets` shares the buckets across router replicas
(`rate_limit_redis_url` in the router config).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from services.common.errors import InvalidInput, RateLimited, Unavailable


class RateLimitUnavailable(Unavailable):
    """The shared rate-limit store cannot be reached and the router is set to fail closed: the request
    is refused (UNAVAILABLE, retryable) instead of being admitted unchecked."""

    reason = "RATE_LIMIT_UNAVAILABLE"
    retry_after_s = 1.0  # google.rpc.RetryInfo / retry-after: about when a short outage is over


@dataclass
class Bucket:
    capacity: float
    rate_per_s: float
    level: float
    stamp: float

    def refill(self, now: float) -> None:
        if now > self.stamp:
            self.level = min(self.capacity, self.level + (now - self.stamp) * self.rate_per_s)
            self.stamp = now

    def wait_for(self, amount: float) -> float:
        """Seconds until `amount` is available (0 when it is now)."""
        return max(0.0, (amount - self.level) / self.rate_per_s)


@dataclass(frozen=True)
class Admission:
    """A granted admission: what to correct when the request ends."""

    key_id: str
    admitted_tokens: int


class RateLimiterBackend(Protocol):
    async def admit(self, key_id: str, rpm: int, tpm: int, tokens: int) -> Admission: ...

    async def settle(self, admission: Admission, tpm: int, actual_tokens: int) -> None: ...

    async def close(self) -> None: ...


def check_fits(tpm: int, tokens: int) -> None:
    """A request that could never pass the tokens/min limit is invalid, not rate limited."""
    if tpm and tokens > tpm:
        raise InvalidInput(
            f"this request may use {tokens} tokens (prompt + max_tokens) but the key allows {tpm} per minute;"
            " lower max_tokens or shorten the prompt",
            field="sampling.max_tokens",
        )


def refusal(waits: list[tuple[float, str]]) -> RateLimited:
    """The refusal for the longest of the waits (seconds, the limit in words)."""
    delay, limit = max(waits)
    return RateLimited(
        f"rate limit of this API key reached ({limit}); retry in {delay:.2f} s",
        retry_after_s=delay,
        metadata={"limit": limit, "retry_after_ms": str(int(delay * 1000))},
    )


class InMemoryBuckets:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._buckets: dict[tuple[str, str], Bucket] = {}
        self._lock = asyncio.Lock()

    def _bucket(self, key_id: str, kind: str, per_minute: int, now: float) -> Bucket:
        bucket = self._buckets.get((key_id, kind))
        capacity = float(per_minute)
        if bucket is None or bucket.capacity != capacity:
            bucket = Bucket(capacity=capacity, rate_per_s=capacity / 60.0, level=capacity, stamp=now)
            self._buckets[(key_id, kind)] = bucket
        bucket.refill(now)
        return bucket

    async def admit(self, key_id: str, rpm: int, tpm: int, tokens: int) -> Admission:
        check_fits(tpm, tokens)
        async with self._lock:
            now = self._clock()
            waits: list[tuple[float, str]] = []
            requests = self._bucket(key_id, "rpm", rpm, now) if rpm else None
            token_bucket = self._bucket(key_id, "tpm", tpm, now) if tpm else None
            if requests is not None and requests.level < 1:
                waits.append((requests.wait_for(1), f"{rpm} requests per minute"))
            if token_bucket is not None and token_bucket.level < tokens:
                waits.append((token_bucket.wait_for(tokens), f"{tpm} tokens per minute"))
            if waits:
                raise refusal(waits)
            if requests is not None:
                requests.level -= 1
            if token_bucket is not None:
                token_bucket.level -= tokens
        return Admission(key_id=key_id, admitted_tokens=tokens if tpm else 0)

    async def settle(self, admission: Admission, tpm: int, actual_tokens: int) -> None:
        if not tpm:
            return
        async with self._lock:
            bucket = self._bucket(admission.key_id, "tpm", tpm, self._clock())
            # Give back what was admitted but not used; an overshoot makes the level go below zero.
            bucket.level = min(bucket.capacity, bucket.level + admission.admitted_tokens - actual_tokens)

    async def close(self) -> None:
        return None


class RateLimiter:
    """Applies a key's limits through a backend."""

    def __init__(self, backend: RateLimiterBackend) -> None:
        self._backend = backend

    async def admit(self, key_id: str, rpm: int, tpm: int, tokens: int) -> Admission:
        if not rpm and not tpm:
            return Admission(key_id=key_id, admitted_tokens=0)
        return await self._backend.admit(key_id, rpm, tpm, tokens)

    async def settle(self, admission: Admission, tpm: int, actual_tokens: int) -> None:
        if tpm and admission.admitted_tokens:
            await self._backend.settle(admission, tpm, actual_tokens)

    async def close(self) -> None:
        await self._backend.close()
