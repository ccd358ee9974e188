"""Every method the router serves declares its authentication in the one table the server is built with."""

from __future__ import annotations

from collections.abc import Sequence

import grpc
import pytest

from autoglm.router.v1 import admin_service_pb2, router_service_pb2
from services.common.errors import Unauthenticated
from services.common.grpc_server import start_server
from services.router.rpc_auth import Auth, auth_wrapper, check_declared, declare, undeclared
from services.router.server import RPC_AUTH
from services.router.types import Principal

ROUTER = router_service_pb2.DESCRIPTOR.services_by_name["RouterService"]
ADMIN = admin_service_pb2.DESCRIPTOR.services_by_name["AdminService"]


def test_every_method_of_both_services_declares_its_authentication() -> None:
    assert undeclared(RPC_AUTH, [ROUTER, ADMIN]) == []
    for method in ROUTER.methods:
        assert RPC_AUTH[f"/{ROUTER.full_name}/{method.name}"] is Auth.API_KEY, method.name
    for method in ADMIN.methods:
        assert RPC_AUTH[f"/{ADMIN.full_name}/{method.name}"] is Auth.ADMIN_TOKEN, method.name


def test_a_method_left_out_of_the_table_keeps_the_server_from_starting() -> None:
    table = {name: kind for name, kind in RPC_AUTH.items() if not name.endswith("/SetPolicy")}
    with pytest.raises(RuntimeError, match="AdminService/SetPolicy"):
        check_declared(table, [ROUTER, ADMIN])


def test_a_misspelt_method_is_refused_when_the_table_is_written() -> None:
    with pytest.raises(ValueError, match="no method Generat"):
        declare(ROUTER, Generat=Auth.API_KEY)


class Keys:
    async def aauthenticate(self, authorization: str) -> Principal:
        if authorization != "Bearer good":
            raise Unauthenticated("unknown API key")
        return Principal(tenant_id="acme", key_id="k1")

    def authenticate_admin(self, authorization: str) -> None:
        raise Unauthenticated("no admin token")


async def test_an_answer_never_leaves_for_an_unauthenticated_caller_even_when_the_servicer_forgets(serve) -> None:  # type: ignore[no-untyped-def]
    forgetful = "/autoglm.router.v1.RouterService/ListModels"

    async def list_models(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return b""  # never asks who is calling

    def register(server: grpc.aio.Server) -> Sequence[str]:
        handler = grpc.unary_unary_rpc_method_handler(list_models)
        server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(
            "autoglm.router.v1.RouterService", {"ListModels": handler, "Undeclared": handler})])
        return []

    table = {forgetful: Auth.API_KEY}
    running = await serve(start_server("router", register, wrap=auth_wrapper(table, Keys())))
    async with grpc.aio.insecure_channel(running.address) as channel:
        for method, metadata, code in [
            (forgetful, [], grpc.StatusCode.UNAUTHENTICATED),
            (forgetful, [("authorization", "Bearer bad")], grpc.StatusCode.UNAUTHENTICATED),
            ("/autoglm.router.v1.RouterService/Undeclared", [("authorization", "Bearer good")],
             grpc.StatusCode.PERMISSION_DENIED),
        ]:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await channel.unary_unary(method)(b"", metadata=metadata, timeout=10)
            assert refused.value.code() == code, method
        assert await channel.unary_unary(forgetful)(b"", metadata=[("authorization", "Bearer good")],
                                                    timeout=10) == b""
