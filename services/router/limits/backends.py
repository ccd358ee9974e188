"""The rate-limit backend a router config asks for: in-process buckets, or Redis shared by replicas."""

from __future__ import annotations

from services.router.limits.token_bucket import InMemoryBuckets, RateLimiterBackend


def rate_limit_backend(redis_url: str, *, fail_open: bool = True) -> RateLimiterBackend:
    """`InMemoryBuckets` when `redis_url` is empty, else `RedisBuckets` on that server, admitting requests
    unchecked while it is unreachable (`fail_open`) or refusing them."""
    if not redis_url:
        return InMemoryBuckets()
    try:
        from services.router.limits.redis_buckets import RedisBuckets
    except ImportError as exc:
        raise ValueError(
            "rate_limit_redis_url is set but the redis package is not installed; install the `redis` extra"
            " (pip install '.[redis]') or leave rate_limit_redis_url empty for in-process limits"
        ) from exc
    return RedisBuckets.from_url(redis_url, fail_open=fail_open)
