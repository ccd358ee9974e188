"""Retries within a budget, streams never retried after a message, the circuit breaker failing fast and
closing again, and timeouts where the smaller of the route timeout and the client deadline wins."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import grpc
import pytest

from autoglm.inference.v1 import inference_service_pb2 as pb
from autoglm.inference.v1 import inference_service_pb2_grpc as pb_grpc
from autoglm.sidecar.v1 import sidecar_admin_service_pb2 as admin_pb
from autoglm.sidecar.v1 import sidecar_admin_service_pb2_grpc as admin_grpc
from sidecar.runtime import RunningSidecar
from tests.integration.sidecar.conftest import Mesh, start_mesh, write_policy
from tests.waiting import wait_until


@pytest.fixture
async def slow_route_mesh(pki: Path, tmp_path: Path, serve):
    """A mesh whose CountTokens route times out after 0.3 s."""
    started: list[RunningSidecar] = []
    try:
        yield await start_mesh(pki, write_policy(tmp_path / "policy.yaml", timeout_s=0.3), serve, started)
    finally:
        for running in reversed(started):
            await running.stop(grace=0)


async def _count(stub: pb_grpc.InferenceServiceStub, timeout: float = 5) -> grpc.StatusCode:
    try:
        await stub.CountTokens(pb.CountTokensRequest(prompt="a b"), timeout=timeout)
        return grpc.StatusCode.OK
    except grpc.aio.AioRpcError as err:
        return err.code()


async def test_half_failing_upstream_succeeds_through_retries_within_budget(mesh: Mesh) -> None:
    mesh.inference.behaviour.fail_ratio = 0.5
    calls, concurrency = 400, 8
    async with mesh.router_outbound() as chan:
        stub = pb_grpc.InferenceServiceStub(chan)
        codes: list[grpc.StatusCode] = []

        async def worker(n: int) -> None:
            for _ in range(n):
                codes.append(await _count(stub))

        await asyncio.gather(*(worker(calls // concurrency) for _ in range(concurrency)))
    success = codes.count(grpc.StatusCode.OK) / len(codes)
    stats = await mesh.retry_stats()
    assert success >= 0.99, f"only {success:.1%} succeeded; {stats}"
    assert mesh.inference.record.failures > calls * 0.3  # the upstream really failed about half the time
    assert stats["retries"] >= mesh.inference.record.failures * 0.9  # failures were retried...
    assert stats["retries"] <= mesh.inference.record.calls  # ...and each retry was one real upstream call
    assert stats["overflow"] == 0
    if "max_active" in stats:  # retries in flight stayed within ratio (2.0) × live requests (8)
        assert stats["max_active"] <= concurrency


async def test_retry_budget_stops_retries_when_exhausted(pki: Path, tmp_path: Path, serve) -> None:
    started: list[RunningSidecar] = []
    try:
        mesh = await start_mesh(pki, write_policy(tmp_path / "p.yaml", budget_ratio=0.0, budget_floor=0),
                                serve, started)
        mesh.inference.behaviour.fail_ratio = 1.0
        async with mesh.router_outbound() as chan:
            code = await _count(pb_grpc.InferenceServiceStub(chan))
        assert code == grpc.StatusCode.UNAVAILABLE
        assert mesh.inference.record.calls == 1  # no budget, no retry
    finally:
        for running in reversed(started):
            await running.stop(grace=0)


async def test_stream_that_delivered_a_message_is_never_retried(mesh: Mesh) -> None:
    mesh.inference.behaviour.fail_after_first = True
    async with mesh.router_outbound() as chan:
        call = pb_grpc.InferenceServiceStub(chan).Generate(pb.GenerateRequest(prompt="hi"), timeout=5)
        got = []
        with pytest.raises(grpc.aio.AioRpcError) as err:
            async for message in call:
                got.append(message.delta)
    assert got == ["tok0 "]
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert mesh.inference.record.calls == 1


async def test_stream_failing_before_its_first_message_is_retried(mesh: Mesh) -> None:
    mesh.inference.behaviour.fail_ratio = 0.5
    async with mesh.router_outbound() as chan:
        stub = pb_grpc.InferenceServiceStub(chan)
        for _ in range(20):
            deltas = [m.delta async for m in stub.Generate(pb.GenerateRequest(prompt="hi"), timeout=5)]
            assert deltas == ["tok0 ", "tok1 ", "tok2 "]
    assert mesh.inference.record.failures > 0


async def test_breaker_opens_on_a_hanging_upstream_and_a_probe_closes_it(slow_route_mesh: Mesh) -> None:
    mesh = slow_route_mesh
    mesh.inference.behaviour.hang = True
    async with mesh.router_outbound() as chan, grpc.aio.insecure_channel(mesh.router_sidecar.admin_address) as adm:
        stub = pb_grpc.InferenceServiceStub(chan)
        admin = admin_grpc.SidecarAdminServiceStub(adm)
        for _ in range(3):  # consecutive_failures: 3
            assert await _count(stub) == grpc.StatusCode.DEADLINE_EXCEEDED
        calls_before = mesh.inference.record.calls
        started = time.monotonic()
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.CountTokens(pb.CountTokensRequest(prompt="a"), timeout=5)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "circuit breaker" in (err.value.details() or "")
        assert time.monotonic() - started < 0.3  # failed fast, without waiting for the route timeout
        assert mesh.inference.record.calls == calls_before
        state = (await admin.GetUpstreams(admin_pb.GetUpstreamsRequest(), timeout=5)).upstreams
        assert state[0].breaker_state == admin_pb.BREAKER_STATE_OPEN

        mesh.inference.behaviour.hang = False  # the upstream recovers
        async def probe_passed() -> bool:
            return await _count(stub) == grpc.StatusCode.OK

        await wait_until(probe_passed, 5, "a probe through the half-open breaker to succeed")
        state = (await admin.GetUpstreams(admin_pb.GetUpstreamsRequest(), timeout=5)).upstreams
        assert state[0].breaker_state == admin_pb.BREAKER_STATE_CLOSED


async def test_route_timeout_caps_a_longer_client_deadline(slow_route_mesh: Mesh) -> None:
    mesh = slow_route_mesh
    mesh.inference.behaviour.hang = True
    async with mesh.router_outbound() as chan:
        started = time.monotonic()
        code = await _count(pb_grpc.InferenceServiceStub(chan), timeout=10)
        elapsed = time.monotonic() - started
        await wait_until(lambda: mesh.inference.record.cancelled >= 1, 5, "the upstream call to be cancelled",
                             interval=0.01)
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert 0.25 < elapsed < 2.0
    assert mesh.inference.record.cancelled == 1  # the upstream call was cancelled


async def test_client_deadline_shorter_than_the_route_timeout_wins(mesh: Mesh) -> None:
    mesh.inference.behaviour.hang = True
    async with mesh.router_outbound() as chan:
        started = time.monotonic()
        code = await _count(pb_grpc.InferenceServiceStub(chan), timeout=0.2)
        elapsed = time.monotonic() - started
        await wait_until(lambda: mesh.inference.record.cancelled >= 1, 5, "the upstream call to be cancelled",
                             interval=0.01)
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert elapsed < 2.0  # the route allows 5 s: the client's 0.2 s won
    assert mesh.inference.record.cancelled == 1
    seen = mesh.inference.record.metadata[0]
    assert "grpc-timeout" not in seen  # the deadline travels as the call's own deadline, not copied metadata

