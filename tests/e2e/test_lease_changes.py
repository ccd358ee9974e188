"""Against the mesh `autoglm up` starts (sidecars, mTLS, the real model; billing leases on by default): a
hard budget lowered with `autoglm budget set --update` while the router admits the tenant's requests
against its lease binds the router before the command returns. Expected: the budget is lowered below
what is already spent, so every request sent after the command returned is refused (RESOURCE_EXHAUSTED):
none is admitted under the lease the router held before the change."""

from __future__ import annotations

import asyncio
import json
import subprocess

import grpc
import pytest

from autoglm.router.v1 import router_service_pb2_grpc
from tests.conftest import tool
from tests.e2e.mesh_client import create_key, generate_request, router_channel, stream
from tests.e2e.mesh_process import Mesh, start_mesh, stop_mesh
from tests.waiting import wait_until

TENANT = "lease-push"


async def budget(mesh: Mesh, *args: str) -> str:
    made = await asyncio.to_thread(subprocess.run, [tool("autoglm"), "budget", *args, "--data-dir",
                                                    str(mesh.data_dir)], capture_output=True, text=True, timeout=60)
    assert made.returncode == 0, made.stderr
    return made.stdout


@pytest.mark.parametrize("sidecar", ["python", "envoy"])
async def test_a_budget_lowered_with_the_cli_binds_the_leasing_router_before_the_command_returns(
        tmp_path, processes, sidecar: str) -> None:
    mesh = start_mesh(tmp_path, processes, extra_args=("--sidecar", sidecar))
    key = await create_key(mesh, TENANT)
    await budget(mesh, "set", "--id", "lease-cap", "--tenant", TENANT, "--amount", "100", "--period", "monthly")
    async with router_channel(mesh) as channel:
        stub = router_service_pb2_grpc.RouterServiceStub(channel)

        async def leased() -> bool:
            assert (await stream(stub, key, generate_request("Name a colour.", 4))).code == grpc.StatusCode.OK
            (row,) = [b for b in json.loads(await budget(mesh, "list", "--format", "json"))
                      if b["id"] == "lease-cap"]
            return float(row["leased"]) > 0
        await wait_until(leased, 120, "the router to hold a lease on the tenant's budget", interval=0.2)
        await budget(mesh, "set", "--update", "--id", "lease-cap", "--tenant", TENANT, "--amount", "0.000001",
                     "--period", "monthly")
        after = [await stream(stub, key, generate_request(f"Name a fruit, number {i}.", 4)) for i in range(3)]
    assert [o.code for o in after] == [grpc.StatusCode.RESOURCE_EXHAUSTED] * 3
    assert stop_mesh(mesh) == 0
