"""Choosing the rate-limit backend from the config, and the Redis backend failing open when no server
answers (no Redis needed: the socket path does not exist)."""

from __future__ import annotations

from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from services.common.errors import InvalidInput
from services.router.config import RouterConfig
from services.router.limits.backends import rate_limit_backend
from services.router.limits.redis_buckets import RedisBuckets
from services.router.limits.token_bucket import Admission, InMemoryBuckets, RateLimiter


def fail_open_count(operation: str) -> float:
    return REGISTRY.get_sample_value("autoglm_router_rate_limit_fail_open_total", {"operation": operation}) or 0.0


def test_the_default_config_keeps_buckets_in_process() -> None:
    assert RouterConfig().rate_limit_redis_url == ""
    assert isinstance(rate_limit_backend(""), InMemoryBuckets)


async def test_a_redis_url_selects_the_shared_backend() -> None:
    backend = rate_limit_backend("redis://127.0.0.1:6379/0")
    assert isinstance(backend, RedisBuckets)
    await backend.close()


def test_a_url_that_is_not_redis_is_rejected_at_start() -> None:
    with pytest.raises(ValueError, match="redis"):
        rate_limit_backend("http://127.0.0.1:6379")


async def test_an_unreachable_redis_admits_and_counts_instead_of_failing(tmp_path: Path) -> None:
    limiter = RateLimiter(RedisBuckets.from_url(f"unix://{tmp_path / 'missing.sock'}"))
    admits, settles = fail_open_count("admit"), fail_open_count("settle")
    try:
        for _ in range(3):  # far beyond the 1 request/min limit: the limit is not enforced while down
            admission = await limiter.admit("k", 1, 600, 100)
            assert admission.admitted_tokens == 0  # nothing was taken, so nothing is given back
        await limiter.settle(Admission(key_id="k", admitted_tokens=100), 600, 10)
    finally:
        await limiter.close()
    assert fail_open_count("admit") == admits + 3
    assert fail_open_count("settle") == settles + 1


async def test_a_request_larger_than_the_minute_allowance_is_invalid_without_asking_redis(tmp_path: Path) -> None:
    limiter = RateLimiter(RedisBuckets.from_url(f"unix://{tmp_path / 'missing.sock'}"))
    try:
        with pytest.raises(InvalidInput, match="per minute"):
            await limiter.admit("k", 0, 100, 101)
    finally:
        await limiter.close()
