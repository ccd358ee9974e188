"""Feeds the balancer: a gRPC health check of every replica at a fixed interval, and `WatchLoad`
reports while a replica streams them. The latest report of each replica (queue, KV use, tokens/s) is
kept for the operator's views (`latest`), with the router's monotonic time it arrived."""

from __future__ import annotations

import asyncio
import contextlib
import time

import grpc
import structlog
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common.errors import Unavailable
from services.router.balancer import Balancer
from services.router.inference_client import GrpcInference
from services.router.ports import LoadReport

log = structlog.get_logger(__name__)


class ReplicaMonitor:
    def __init__(self, balancer: Balancer, inference: GrpcInference, interval_s: float = 1.0) -> None:
        self._balancer = balancer
        self._inference = inference
        self._interval_s = interval_s
        self._tasks: dict[str, list[asyncio.Task[None]]] = {}
        self._reports: dict[str, tuple[LoadReport, float]] = {}

    def latest(self, address: str) -> tuple[LoadReport, float] | None:
        """The replica's latest load report and its age in seconds, or None before the first."""
        found = self._reports.get(address)
        return None if found is None else (found[0], time.monotonic() - found[1])

    def watch(self, addresses: tuple[str, ...]) -> None:
        for address in addresses:
            if address not in self._tasks:
                self._tasks[address] = [
                    asyncio.create_task(self._health_loop(address)),
                    asyncio.create_task(self._load_loop(address)),
                ]

    async def check_once(self, address: str) -> bool:
        stub = health_pb2_grpc.HealthStub(self._inference.channel(address))
        try:
            reply = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=max(0.5, self._interval_s))
            ok = reply.status == health_pb2.HealthCheckResponse.SERVING
        except grpc.aio.AioRpcError:
            ok = False
        self._balancer.health_check(address, ok)
        return ok

    async def _health_loop(self, address: str) -> None:
        while True:
            await self.check_once(address)
            await asyncio.sleep(self._interval_s)

    async def _load_loop(self, address: str) -> None:
        while True:
            try:
                async for report in self._inference.watch_load(address, int(self._interval_s * 1000)):
                    self._balancer.report_load(address, report.queue_depth, report.active_sequences, report.ready)
                    self._reports[address] = (report, time.monotonic())
            except Unavailable:
                pass
            await asyncio.sleep(self._interval_s)

    async def close(self) -> None:
        tasks = [t for group in self._tasks.values() for t in group]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
