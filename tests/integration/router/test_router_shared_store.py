"""Two real router processes on one PostgreSQL (billing and an inference replica real too): a key created
through router A's AdminService works through router B at once; revoked through B, A refuses it within
1 s."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import grpc

from autoglm.router.v1 import admin_service_pb2 as admin_pb2
from autoglm.router.v1 import admin_service_pb2_grpc as admin_grpc
from autoglm.router.v1 import router_service_pb2 as pb2
from autoglm.router.v1 import router_service_pb2_grpc as router_grpc
from tests.integration.billing.conftest import PgServer, postgres  # noqa: F401 - the session's PostgreSQL
from tests.integration.router.conftest import ADMIN_TOKEN
from tests.integration.router.service_process import drain, start_service, stop
from tests.integration.router.test_router_vertical import bearer
from tests.waiting import wait_until

ADMIN = [("authorization", f"Bearer {ADMIN_TOKEN}")]
PROPAGATION_S = 1.0


def start_router(tmp_path: Path, name: str, dsn: str, inference: str, billing: str,
                 processes: list[subprocess.Popen[bytes]]) -> str:
    config = tmp_path / f"{name}.yaml"
    config.write_text(json.dumps({"router": {
        "admin_token": ADMIN_TOKEN, "data_dir": str(tmp_path / name), "database": dsn,
        "key_pepper_path": str(tmp_path / "key_pepper")}}))
    proc, address = start_service("router", ["--config", str(config), "--inference", inference,
                                             "--billing", billing], processes)
    drain(proc)
    return address


async def accepted(router: router_grpc.RouterServiceStub, secret: str) -> bool:
    try:
        await router.ListModels(pb2.ListModelsRequest(), metadata=bearer(secret), timeout=10)
        return True
    except grpc.aio.AioRpcError as error:
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED, error
        return False


async def test_a_key_made_through_one_router_works_through_another_and_its_revocation_reaches_both(
    postgres: PgServer, tmp_path: Path,  # noqa: F811
) -> None:
    dsn = postgres.create_database()
    processes: list[subprocess.Popen[bytes]] = []
    try:
        billing_proc, billing = start_service("billing", ["--data-dir", str(tmp_path / "billing")], processes)
        drain(billing_proc)
        inference_proc, inference = start_service("inference", ["--replica-id", "r1", "--threads", "1"], processes)
        drain(inference_proc)
        a = start_router(tmp_path, "a", dsn, inference, billing, processes)
        b = start_router(tmp_path, "b", dsn, inference, billing, processes)
        async with grpc.aio.insecure_channel(a) as channel_a, grpc.aio.insecure_channel(b) as channel_b:
            router_a, router_b = router_grpc.RouterServiceStub(channel_a), router_grpc.RouterServiceStub(channel_b)
            created = await admin_grpc.AdminServiceStub(channel_a).CreateApiKey(
                admin_pb2.CreateApiKeyRequest(tenant_id="shared"), metadata=ADMIN, timeout=10)
            assert await accepted(router_b, created.secret)  # at once, with no wait
            assert await accepted(router_a, created.secret)
            await admin_grpc.AdminServiceStub(channel_b).RevokeApiKey(
                admin_pb2.RevokeApiKeyRequest(key_id=created.api_key.key_id), metadata=ADMIN, timeout=10)
            assert not await accepted(router_b, created.secret)
            await wait_until(lambda: _refused(router_a, created.secret), PROPAGATION_S,
                             "router A to refuse the key revoked through router B")
    finally:
        stop(processes)


async def _refused(router: router_grpc.RouterServiceStub, secret: str) -> bool:
    return not await accepted(router, secret)
