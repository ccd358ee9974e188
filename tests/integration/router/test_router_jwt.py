"""JWTs over real gRPC against the router: a token signed by the JWKS key is accepted, bad tokens get
UNAUTHENTICATED with a message naming the problem, and rotating the JWKS file takes effect without a restart."""

from __future__ import annotations

import time
from pathlib import Path

import grpc
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from autoglm.router.v1 import router_service_pb2 as pb2
from autoglm.router.v1 import router_service_pb2_grpc as router_grpc
from services.billing.config import BillingConfig
from services.billing.server import build_server as build_billing
from services.common.config import ServerSettings
from services.router.config import RouterConfig
from services.router.server import build_server as build_router
from tests.unit.router.test_jwt import signed, write_jwks

EPHEMERAL = ServerSettings(port=0)
ISSUER, AUDIENCE = "https://idp.example", "autoglm-router"


async def test_jwks_tokens_over_grpc_rotation_and_refusals(serve, tmp_path: Path) -> None:
    jwks = tmp_path / "jwks.json"
    old, new = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    write_jwks(jwks, {"k1": old})
    billing = await serve(build_billing(BillingConfig(server=EPHEMERAL, data_dir=tmp_path / "billing")))
    router = await serve(build_router(RouterConfig(
        server=EPHEMERAL, billing_target=billing.address, data_dir=tmp_path / "router", admin_token="admin",
        jwt_jwks_path=str(jwks), jwt_issuer=ISSUER, jwt_audience=AUDIENCE)))
    claims = {"tenant": "acme", "exp": int(time.time() + 300), "iss": ISSUER, "aud": AUDIENCE}

    async with grpc.aio.insecure_channel(router.address) as chan:
        stub = router_grpc.RouterServiceStub(chan)

        async def list_models(token: str) -> pb2.ListModelsResponse:
            return await stub.ListModels(pb2.ListModelsRequest(), metadata=[("authorization", f"Bearer {token}")],
                                         timeout=10)

        async def refused(token: str, message: str) -> None:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await list_models(token)
            assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED, caught.value.details()
            assert message in (caught.value.details() or "")

        await list_models(signed(old, "k1", claims))
        await refused(signed(old, "k1", {**claims, "rpm": "lots"}), "JWT claim 'rpm' must be a non-negative integer")
        await refused(signed(old, "k1", {k: v for k, v in claims.items() if k != "exp"}), "no 'exp' claim")
        await refused(signed(old, "k1", {**claims, "exp": int(time.time() - 3600)}), "JWT has expired")
        await refused(signed(old, "k1", {**claims, "aud": "another-service"}), "audience (aud)")
        await refused(signed(new, "k1", claims), "signature is invalid")
        await refused("eyJhbGciOiJFUzI1NiJ9.@@@.x", "malformed JWT")

        write_jwks(jwks, {"k1": new})  # rotate the key in place: no restart
        await list_models(signed(new, "k1", claims))
        await refused(signed(old, "k1", claims), "signature is invalid")
