"""An upstream cluster: its endpoints (one grpc.aio channel each), circuit breaker, outlier detector,
retry budget and concurrency counter. Channels are swapped (not closed under calls) when the sidecar's
certificates rotate.

A `least_request` cluster (the local service run as several copies, e.g. `router.replicas`) sends each
call to the endpoint with the fewest calls in flight, among those whose standard gRPC health check
(`check_health_forever`) last answered SERVING; a copy that stops or drains (NOT_SERVING) is left out
until it serves again."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Any

import grpc
import structlog
from grpc_health.v1 import health_pb2

from sidecar.breaker import BreakerState, CircuitBreaker
from sidecar.methods import CallType
from sidecar.outlier import OutlierDetector
from sidecar.policy import ServicePolicy
from sidecar.retry import RetryBudgetState

log = structlog.get_logger("sidecar")

HEALTH_CHECK = "/grpc.health.v1.Health/Check"

CHANNEL_OPTIONS: tuple[tuple[str, Any], ...] = (
    ("grpc.max_receive_message_length", 8 * 1024 * 1024),
    ("grpc.max_send_message_length", 8 * 1024 * 1024),
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.enable_retries", 0),
)

ChannelFactory = Callable[[str], grpc.aio.Channel]


class Endpoint:
    """One upstream address with a channel and its per-method multicallables (made once, reused)."""

    def __init__(self, address: str, factory: ChannelFactory) -> None:
        self.address = address
        self.channel = factory(address)
        self._callables: dict[str, Any] = {}

    def callable(self, method: str, kind: CallType) -> Any:
        found = self._callables.get(method)
        if found is None:
            ch = self.channel
            maker = {
                CallType.UNARY_UNARY: ch.unary_unary, CallType.UNARY_STREAM: ch.unary_stream,
                CallType.STREAM_UNARY: ch.stream_unary, CallType.STREAM_STREAM: ch.stream_stream,
            }[kind]
            found = self._callables[method] = maker(method)
        return found


class Cluster:
    def __init__(self, name: str, addresses: Sequence[str], factory: ChannelFactory, policy: ServicePolicy | None,
                 *, resilience: bool, on_breaker_change: Callable[[str, BreakerState], None] | None = None,
                 least_request: bool = False) -> None:
        if not addresses:
            raise ValueError(f"cluster {name}: no endpoint addresses")
        self.name = name
        self.addresses = tuple(addresses)
        self.policy = policy
        self.endpoints = [Endpoint(a, factory) for a in addresses]
        self.active = 0
        # Per endpoint: calls in flight and the last health check's verdict (least_request clusters).
        self.least_request = least_request and len(addresses) > 1
        self.outstanding = [0] * len(addresses)
        self.healthy = [True] * len(addresses)
        self._turn = 0
        self.resilience = resilience and policy is not None
        self.max_concurrent = policy.max_concurrent if policy else 1 << 30
        self.breaker: CircuitBreaker | None = None
        self.outlier: OutlierDetector | None = None
        self.budget: RetryBudgetState | None = None
        self._retired: list[grpc.aio.Channel] = []
        if policy is not None and self.resilience:
            change = (lambda state: on_breaker_change(name, state)) if on_breaker_change else None
            self.breaker = CircuitBreaker(policy.circuit_breaker, on_change=change)
            self.outlier = OutlierDetector(self.addresses, policy.outlier)
            self.budget = RetryBudgetState(policy.retry_budget)

    def update_policy(self, policy: ServicePolicy | None) -> None:
        self.policy = policy
        if policy is None:
            return
        self.max_concurrent = policy.max_concurrent
        if self.breaker:
            self.breaker.policy = policy.circuit_breaker
        if self.outlier:
            self.outlier.policy = policy.outlier
        if self.budget:
            self.budget.budget = policy.retry_budget

    def pick(self) -> int:
        if self.least_request:
            return self._least_outstanding()
        return self.outlier.pick() if self.outlier else 0

    def _least_outstanding(self) -> int:
        """The healthy endpoint with the fewest calls in flight (all endpoints when none is healthy); ties
        taken in turn, so an idle cluster still spreads its calls."""
        count = len(self.endpoints)
        start = self._turn
        self._turn = (start + 1) % count
        best, best_key = 0, (2, 0)
        for step in range(count):
            index = (start + step) % count
            key = (0 if self.healthy[index] else 1, self.outstanding[index])
            if key < best_key:
                best, best_key = index, key
        return best

    def take(self, index: int) -> None:
        self.outstanding[index] += 1

    def release(self, index: int) -> None:
        self.outstanding[index] -= 1

    async def check_health(self, timeout_s: float) -> None:
        """Ask every endpoint's standard health service once; SERVING marks it healthy, anything else not."""

        async def check(index: int) -> None:
            call = self.endpoints[index].callable(HEALTH_CHECK, CallType.UNARY_UNARY)
            try:
                reply = health_pb2.HealthCheckResponse.FromString(await call(b"", timeout=timeout_s))
                healthy = reply.status == health_pb2.HealthCheckResponse.SERVING
            except grpc.aio.AioRpcError:
                healthy = False
            self.healthy[index] = healthy

        await asyncio.gather(*(check(i) for i in range(len(self.endpoints))))

    async def check_health_forever(self, interval_s: float = 0.5) -> None:
        while True:
            try:
                await self.check_health(timeout_s=max(interval_s, 1.0))
            except Exception as exc:  # a failed round leaves the verdicts; the next one retries
                log.warning("health_check_round_failed", cluster=self.name, error=repr(exc))
            await asyncio.sleep(interval_s)

    def rebuild_channels(self, factory: ChannelFactory, grace: float = 60.0) -> None:
        """New calls use new channels; calls on the old ones finish (closed after `grace`)."""
        old = [e.channel for e in self.endpoints]
        self._retired.extend(old)
        self.endpoints = [Endpoint(a, factory) for a in self.addresses]
        loop = asyncio.get_running_loop()
        for channel in old:
            loop.call_later(grace, self._close_retired, channel)

    def _close_retired(self, channel: grpc.aio.Channel) -> None:
        if channel in self._retired:
            self._retired.remove(channel)
            asyncio.get_running_loop().create_task(channel.close(grace=None))

    async def close(self) -> None:
        for channel in [*self._retired, *(e.channel for e in self.endpoints)]:
            await channel.close(grace=None)
        self._retired.clear()
