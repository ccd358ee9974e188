"""Over a real socket, every AdminService method refuses a call without the admin token and every
RouterService method a call without an API key (UNAUTHENTICATED), whatever the servicer does."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor

from autoglm.router.v1 import admin_service_pb2, router_service_pb2
from services.common.config import ServerSettings
from services.router.config import RouterConfig
from services.router.server import build_server as build_router

ADMIN_TOKEN = "test-admin-token"
ROUTER = router_service_pb2.DESCRIPTOR.services_by_name["RouterService"]
ADMIN = admin_service_pb2.DESCRIPTOR.services_by_name["AdminService"]
MODULES = {ROUTER: router_service_pb2, ADMIN: admin_service_pb2}


async def call(channel: grpc.aio.Channel, service: ServiceDescriptor, method: MethodDescriptor,
               authorization: str | None) -> grpc.StatusCode:
    module = MODULES[service]
    request_type = getattr(module, method.input_type.name)
    response_type = getattr(module, method.output_type.name)
    path = f"/{service.full_name}/{method.name}"
    metadata = [("authorization", authorization)] if authorization is not None else []
    try:
        if method.server_streaming:
            stream = channel.unary_stream(path, request_serializer=request_type.SerializeToString,
                                          response_deserializer=response_type.FromString)
            async for _ in stream(request_type(), metadata=metadata, timeout=10):
                pass
        else:
            unary = channel.unary_unary(path, request_serializer=request_type.SerializeToString,
                                        response_deserializer=response_type.FromString)
            await unary(request_type(), metadata=metadata, timeout=10)
    except grpc.aio.AioRpcError as error:
        return error.code()
    return grpc.StatusCode.OK


@pytest.fixture
async def router_channel(serve, tmp_path: Path):  # type: ignore[no-untyped-def]
    running = await serve(build_router(RouterConfig(server=ServerSettings(port=0), data_dir=tmp_path / "router",
                                                    admin_token=ADMIN_TOKEN, billing_target="127.0.0.1:1")))
    async with grpc.aio.insecure_channel(running.address) as channel:
        yield channel


@pytest.mark.parametrize("authorization", [None, "Bearer wrong-token", "Basic " + ADMIN_TOKEN, "Bearer agk_x_y"])
async def test_every_admin_method_refuses_a_call_without_the_admin_token(router_channel, authorization) -> None:  # type: ignore[no-untyped-def]
    assert len(ADMIN.methods) >= 11
    codes = {m.name: await call(router_channel, ADMIN, m, authorization) for m in ADMIN.methods}
    assert codes == {m.name: grpc.StatusCode.UNAUTHENTICATED for m in ADMIN.methods}


async def test_with_the_admin_token_the_admin_methods_run(router_channel) -> None:  # type: ignore[no-untyped-def]
    codes = {m.name: await call(router_channel, ADMIN, m, f"Bearer {ADMIN_TOKEN}") for m in ADMIN.methods}
    assert grpc.StatusCode.UNAUTHENTICATED not in codes.values(), codes
    assert codes["ListApiKeys"] == codes["ListAuditEvents"] == grpc.StatusCode.OK


async def test_every_router_method_refuses_a_call_without_an_api_key(router_channel) -> None:  # type: ignore[no-untyped-def]
    for authorization in (None, f"Bearer {ADMIN_TOKEN}"):
        codes = {m.name: await call(router_channel, ROUTER, m, authorization) for m in ROUTER.methods}
        assert codes == {m.name: grpc.StatusCode.UNAUTHENTICATED for m in ROUTER.methods}, authorization
