"""Per-key rate limits kept in a real redis-server (unix socket in a tmp dir): the in-memory semantics,
one key's limit shared exactly by two router replicas, fail-open on an outage, and the real router
answering RESOURCE_EXHAUSTED once the key's requests/min are used up."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import grpc
import pytest
from prometheus_client import REGISTRY
from redis.asyncio import Redis
from redis.exceptions import RedisError

from autoglm.common.v1 import generation_pb2
from autoglm.router.v1 import admin_service_pb2 as admin_pb2
from autoglm.router.v1 import router_service_pb2 as pb2
from services.common.errors import RateLimited
from services.inference.engine.model import LoadedModel
from services.router.limits.redis_buckets import RedisBuckets
from services.router.limits.token_bucket import Admission, RateLimiter, RateLimitUnavailable
from tests.conftest import require_real_component
from tests.integration.router.conftest import MODEL, start_mesh
from tests.integration.router.test_router_controls import retry_delay_s
from tests.integration.router.test_router_vertical import bearer
from tests.waiting import wait_until_blocking

REDIS_SERVER = shutil.which("redis-server")


@pytest.fixture(autouse=True)
def _redis_installed() -> None:
    require_real_component(REDIS_SERVER is not None, "redis-server",
                           "`make redis-server`, or apt-get install redis-server")


@dataclass
class RedisProcess:
    process: subprocess.Popen[bytes]
    socket: Path

    @property
    def url(self) -> str:
        return f"unix://{self.socket}"

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()


@pytest.fixture
def redis_server() -> Iterator[RedisProcess]:
    """A throwaway redis-server on a unix socket (no TCP port, no persistence), stopped by PID."""
    assert REDIS_SERVER is not None
    # A short directory of its own: unix socket paths are limited to ~100 bytes.
    directory = Path(tempfile.mkdtemp(prefix="autoglm-redis-"))
    sock = directory / "redis.sock"
    process = subprocess.Popen(
        [REDIS_SERVER, "--port", "0", "--unixsocket", str(sock), "--unixsocketperm", "700",
         "--save", "", "--appendonly", "no", "--dir", str(directory)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    running = RedisProcess(process, sock)
    try:
        _wait_until_serving(running)
        yield running
    finally:
        running.stop()
        shutil.rmtree(directory, ignore_errors=True)


def _wait_until_serving(server: RedisProcess, timeout_s: float = 10.0) -> None:
    import redis

    def serving() -> bool:
        if server.process.poll() is not None:
            raise RuntimeError(f"redis-server exited with {server.process.returncode}")
        try:
            return server.socket.exists() and bool(redis.Redis(unix_socket_path=str(server.socket)).ping())
        except RedisError:
            return False

    wait_until_blocking(serving, timeout_s, "redis-server to answer PING on its socket", interval=0.02)


@pytest.fixture
async def buckets(redis_server: RedisProcess) -> AsyncIterator[RedisBuckets]:
    backend = RedisBuckets.from_url(redis_server.url)
    try:
        yield backend
    finally:
        await backend.close()


@pytest.fixture
async def raw(redis_server: RedisProcess) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_server.url, decode_responses=True)
    try:
        yield client
    finally:
        await client.aclose()


async def stored_level(raw: Redis, key: str) -> float:
    value = await cast("Awaitable[str | None]", raw.hget(key, "level"))
    assert value is not None, f"no bucket stored at {key}"
    return float(value)


async def test_a_burst_is_admitted_then_refused_with_the_delay_until_the_next_request_fits(
        buckets: RedisBuckets) -> None:
    limiter = RateLimiter(buckets)
    for _ in range(3):
        await limiter.admit("k", 3, 0, 10)
    with pytest.raises(RateLimited) as refused:
        await limiter.admit("k", 3, 0, 10)
    # One request refills every 20 s at 3/min; a little of it has refilled while the test ran.
    assert 19.0 < refused.value.retry_after_s <= 20.0
    assert refused.value.metadata["limit"] == "3 requests per minute"
    assert "retry in" in refused.value.message
    await limiter.admit("other", 3, 0, 10)  # buckets are per key


async def test_tokens_are_taken_up_front_and_settle_gives_back_what_was_not_used(buckets: RedisBuckets) -> None:
    limiter = RateLimiter(buckets)
    first = await limiter.admit("k", 0, 600, 400)
    with pytest.raises(RateLimited) as refused:
        await limiter.admit("k", 0, 600, 400)
    # 200 left, 400 needed: 200 tokens at 10 tokens/s.
    assert 19.0 < refused.value.retry_after_s <= 20.0
    assert refused.value.metadata["limit"] == "600 tokens per minute"
    await limiter.settle(first, 600, 50)  # used 50 of 400: 350 come back
    await limiter.admit("k", 0, 600, 400)


async def test_settle_takes_an_overshoot_and_never_fills_past_capacity(buckets: RedisBuckets, raw: Redis) -> None:
    limiter = RateLimiter(buckets)
    # 60 tokens/min = 1 token/s. An admission whose bucket has refilled to full since (here: expired)
    # gives back its 10 unused tokens, but the bucket holds at most one minute's allowance.
    await limiter.settle(Admission(key_id="k", admitted_tokens=10), 60, 0)
    assert await stored_level(raw, "autoglm:rl:{k}:tpm") == 60.0
    await limiter.admit("k", 0, 60, 60)
    with pytest.raises(RateLimited) as refused:
        await limiter.admit("k", 0, 60, 5)
    assert 4.0 < refused.value.retry_after_s <= 5.0

    overshoot = await limiter.admit("o", 0, 60, 10)  # 50 left
    await limiter.settle(overshoot, 60, 40)  # used 40, not 10: 30 more are taken, 20 left
    with pytest.raises(RateLimited) as refused:
        await limiter.admit("o", 0, 60, 30)
    assert 9.0 < refused.value.retry_after_s <= 10.0


async def test_both_limits_are_checked_and_a_refusal_takes_nothing(buckets: RedisBuckets) -> None:
    limiter = RateLimiter(buckets)
    await limiter.admit("k", 2, 600, 500)
    with pytest.raises(RateLimited) as refused:
        await limiter.admit("k", 2, 600, 500)  # tokens refuse; the request bucket must not be charged
    assert refused.value.metadata["limit"] == "600 tokens per minute"
    await limiter.admit("k", 2, 600, 50)  # the second request of the minute still fits
    with pytest.raises(RateLimited) as refused:
        await limiter.admit("k", 2, 600, 1)
    assert refused.value.metadata["limit"] == "2 requests per minute"


async def test_two_replicas_share_one_keys_limit_exactly(redis_server: RedisProcess) -> None:
    # Failing closed with a generous timeout: on a loaded machine a call past the default 0.5 s would
    # otherwise be admitted unchecked (fail open) and count as a pass Redis never granted.
    replicas = [RedisBuckets.from_url(redis_server.url, timeout_s=10.0, fail_open=False) for _ in range(2)]
    try:
        limiters = [RateLimiter(backend) for backend in replicas]
        # 10/min: the next request refills in 6 s, far beyond this test's duration.
        for i in range(10):
            await limiters[i % 2].admit("shared", 10, 0, 1)
        for limiter in limiters:
            with pytest.raises(RateLimited):
                await limiter.admit("shared", 10, 0, 1)

        # Concurrently: 40 attempts from both replicas at once, exactly 10 pass.
        async def attempt(limiter: RateLimiter) -> bool:
            try:
                await limiter.admit("race", 10, 0, 1)
            except RateLimited:
                return False
            return True

        outcomes = await asyncio.gather(*[attempt(limiters[i % 2]) for i in range(40)])
        assert sum(outcomes) == 10
    finally:
        for backend in replicas:
            await backend.close()


async def test_buckets_live_in_hashes_with_a_ttl_so_idle_keys_vanish(buckets: RedisBuckets, raw: Redis) -> None:
    await RateLimiter(buckets).admit("k1", 5, 600, 100)
    rpm_key, tpm_key = "autoglm:rl:{k1}:rpm", "autoglm:rl:{k1}:tpm"
    assert await stored_level(raw, rpm_key) == pytest.approx(4.0, abs=0.01)
    assert await stored_level(raw, tpm_key) == pytest.approx(500.0, abs=1.0)
    for key in (rpm_key, tpm_key):
        assert 60_000 < await raw.pttl(key) <= 121_000


async def test_a_changed_limit_starts_a_fresh_bucket(buckets: RedisBuckets) -> None:
    limiter = RateLimiter(buckets)
    await limiter.admit("k", 1, 0, 1)
    with pytest.raises(RateLimited):
        await limiter.admit("k", 1, 0, 1)
    await limiter.admit("k", 5, 0, 1)  # the key's limit was raised: a full bucket of 5


async def test_a_redis_outage_lets_requests_through_and_counts_them(
        redis_server: RedisProcess, buckets: RedisBuckets) -> None:
    limiter = RateLimiter(buckets)
    await limiter.admit("k", 1, 0, 1)
    with pytest.raises(RateLimited):
        await limiter.admit("k", 1, 0, 1)
    before = REGISTRY.get_sample_value("autoglm_router_rate_limit_fail_open_total", {"operation": "admit"}) or 0.0
    redis_server.stop()
    started = time.monotonic()
    admission = await limiter.admit("k", 1, 0, 1)  # fail open: admitted unchecked
    assert time.monotonic() - started < 3.0
    assert admission.admitted_tokens == 0
    after = REGISTRY.get_sample_value("autoglm_router_rate_limit_fail_open_total", {"operation": "admit"})
    assert after == before + 1


def greedy(max_tokens: int) -> generation_pb2.SamplingParams:
    return generation_pb2.SamplingParams(temperature=0.0, max_tokens=max_tokens)


async def test_the_router_refuses_with_resource_exhausted_once_the_shared_limit_is_used(
        serve, tmp_path: Path, loaded_model: LoadedModel, redis_server: RedisProcess) -> None:
    mesh = await start_mesh(serve, tmp_path, loaded_model, rate_limit_redis_url=redis_server.url)
    other_replica = RedisBuckets.from_url(redis_server.url)
    try:
        secret, key = await mesh.create_key("acme", limits=admin_pb2.KeyLimits(requests_per_minute=2))
        request = pb2.CompleteRequest(model=MODEL, prompt="Hi", sampling=greedy(2),
                                      cache_policy=pb2.CACHE_POLICY_BYPASS)
        await mesh.router_stub.Complete(request, metadata=bearer(secret), timeout=60)
        # Another router replica admits the key's second request of the minute through the same Redis.
        await RateLimiter(other_replica).admit(key.key_id, 2, 0, 1)
        with pytest.raises(grpc.aio.AioRpcError) as limited:
            await mesh.router_stub.Complete(request, metadata=bearer(secret), timeout=60)
        assert limited.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "2 requests per minute" in (limited.value.details() or "")
        assert 0 < retry_delay_s(limited.value) <= 30
    finally:
        await other_replica.close()
        await mesh.channel.close()
        await mesh.billing_channel.close()


async def test_a_redis_outage_refuses_admissions_when_set_to_fail_closed(redis_server: RedisProcess) -> None:
    backend = RedisBuckets.from_url(redis_server.url, fail_open=False)
    try:
        limiter = RateLimiter(backend)
        admission = await limiter.admit("k", 5, 600, 10)
        before = REGISTRY.get_sample_value("autoglm_router_rate_limit_fail_closed_total") or 0.0
        redis_server.stop()
        started = time.monotonic()
        with pytest.raises(RateLimitUnavailable) as refused:
            await limiter.admit("k", 5, 600, 10)
        assert time.monotonic() - started < 3.0
        assert refused.value.reason == "RATE_LIMIT_UNAVAILABLE" and "try again" in refused.value.message
        assert REGISTRY.get_sample_value("autoglm_router_rate_limit_fail_closed_total") == before + 1
        await limiter.settle(admission, 600, 4)  # a request admitted before the outage still ends cleanly
    finally:
        await backend.close()


@pytest.mark.parametrize("fail_open", [True, False], ids=["fail-open", "fail-closed"])
async def test_the_router_follows_its_redis_failure_setting_when_redis_is_stopped(
        serve, tmp_path: Path, loaded_model: LoadedModel, redis_server: RedisProcess, fail_open: bool) -> None:
    mesh = await start_mesh(serve, tmp_path, loaded_model, rate_limit_redis_url=redis_server.url,
                            rate_limit_redis_fail_open=fail_open)
    try:
        secret, _ = await mesh.create_key("acme", limits=admin_pb2.KeyLimits(requests_per_minute=100))
        request = pb2.CompleteRequest(model=MODEL, prompt="Hi", sampling=greedy(2),
                                      cache_policy=pb2.CACHE_POLICY_BYPASS)
        await mesh.router_stub.Complete(request, metadata=bearer(secret), timeout=60)
        redis_server.stop()
        if fail_open:
            reply = await mesh.router_stub.Complete(request, metadata=bearer(secret), timeout=60)
            assert reply.usage.completion_tokens >= 1
        else:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await mesh.router_stub.Complete(request, metadata=bearer(secret), timeout=60)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "rate-limit service cannot be reached" in (refused.value.details() or "")
            assert 0 < retry_delay_s(refused.value) <= 5
    finally:
        await mesh.channel.close()
        await mesh.billing_channel.close()
