"""Every service starts on port 0 through the shared fixture, answers health and reflection, and drains
on stop (health NOT_SERVING first, then the port closes)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from services.billing.config import BillingConfig
from services.billing.server import build_server as build_billing
from services.common.config import ServerSettings
from services.common.grpc_server import RunningServer
from services.inference.config import InferenceConfig
from services.inference.server import build_server as build_inference
from services.router.config import RouterConfig
from services.router.server import build_server as build_router
from tests.conftest import channel

EPHEMERAL = ServerSettings(port=0)

BUILDERS: dict[str, tuple[Callable[[Path], Awaitable[RunningServer]], list[str]]] = {
    "router": (
        lambda tmp: build_router(RouterConfig(server=EPHEMERAL, data_dir=tmp / "router")),
        ["autoglm.router.v1.RouterService", "autoglm.router.v1.AdminService"],
    ),
    "billing": (
        lambda tmp: build_billing(BillingConfig(server=EPHEMERAL, data_dir=tmp)),
        ["autoglm.billing.v1.BillingService"],
    ),
    "inference": (
        lambda tmp: build_inference(InferenceConfig(server=EPHEMERAL)),
        ["autoglm.inference.v1.InferenceService"],
    ),
}


@pytest.mark.parametrize("name", sorted(BUILDERS))
async def test_health_reports_serving_for_each_service(serve, tmp_path: Path, name: str) -> None:
    build, services = BUILDERS[name]
    running = await serve(build(tmp_path))
    assert running.port > 0
    async with channel(running) as chan:
        stub = health_pb2_grpc.HealthStub(chan)
        for service in ["", *services]:
            reply = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING, service
        with pytest.raises(grpc.aio.AioRpcError) as unknown:
            await stub.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=5)
        assert unknown.value.code() == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize("name", sorted(BUILDERS))
async def test_reflection_lists_services_health_and_reflection(serve, tmp_path: Path, name: str) -> None:
    build, services = BUILDERS[name]
    running = await serve(build(tmp_path))
    async with channel(running) as chan:
        stub = reflection_pb2_grpc.ServerReflectionStub(chan)
        call = stub.ServerReflectionInfo()
        await call.write(reflection_pb2.ServerReflectionRequest(list_services=""))
        reply = await call.read()
        await call.done_writing()
        listed = {s.name for s in reply.list_services_response.service}
    assert set(services) <= listed
    assert "grpc.health.v1.Health" in listed
    assert "grpc.reflection.v1alpha.ServerReflection" in listed


async def test_graceful_stop_turns_health_not_serving_then_closes(serve, tmp_path: Path) -> None:
    running = await serve(build_billing(BillingConfig(server=EPHEMERAL, data_dir=tmp_path)))
    async with channel(running) as chan:
        stub = health_pb2_grpc.HealthStub(chan)
        watch = stub.Watch(health_pb2.HealthCheckRequest(service=""))
        first = await watch.read()
        assert first.status == health_pb2.HealthCheckResponse.SERVING
        stopping = asyncio.create_task(running.stop(grace=1))
        second = await watch.read()
        assert second.status == health_pb2.HealthCheckResponse.NOT_SERVING
        await stopping
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=2)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
