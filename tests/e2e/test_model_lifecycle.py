"""Model version states as operators and users meet them on the mesh `autoglm up` starts: the bundled
model comes up ACTIVE; `autoglm models set-state` deprecates a version (its traffic goes to the stable
one, the official `openai` client pinned to it gets the deprecation headers), retires it (a pinned call is
a 400 naming the state), refuses a move the state does not allow naming the current state; `autoglm
models` and `autoglm models history` show states and every move; `autoglm audit` holds who and why."""

from __future__ import annotations

import json
import ssl
import subprocess
from collections.abc import Iterator

import httpx
import openai
import pytest

from autoglm.billing.v1 import billing_service_pb2, billing_service_pb2_grpc
from autoglm.common.v1 import money_pb2
from autoglm.router.v1 import admin_service_pb2, admin_service_pb2_grpc
from services.cli.endpoint import billing_token, load_endpoint, operator_channel
from tests.conftest import tool
from tests.e2e.mesh_client import MODEL, router_channel
from tests.e2e.mesh_process import Mesh, start_mesh, stop_mesh

NAME = "lifecycle-m"


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    started: list[subprocess.Popen[bytes]] = []
    running = start_mesh(tmp_path_factory.mktemp("mesh"), started)
    try:
        yield running
    finally:
        if running.process.poll() is None:
            stop_mesh(running)
        assert running.descendants() == []


def autoglm(mesh: Mesh, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([tool("autoglm"), *args, "--data-dir", str(mesh.data_dir)], capture_output=True,
                          text=True, timeout=60)


async def register_two_versions(mesh: Mesh) -> None:
    """NAME with versions v1 and v2 on the bundled model's replica, split 700/300, and a price."""
    metadata = (("authorization", f"Bearer {(mesh.data_dir / 'router' / 'admin_token').read_text().strip()}"),)
    async with router_channel(mesh) as channel:
        admin = admin_service_pb2_grpc.AdminServiceStub(channel)
        bundled = (await admin.GetModel(admin_service_pb2.GetModelRequest(model=MODEL), metadata=metadata,
                                        timeout=10)).model
        assert [v.state for v in bundled.versions] == [3]  # the seeded bundled model is ACTIVE
        for version in ("v1", "v2"):
            await admin.RegisterModelVersion(admin_service_pb2.RegisterModelVersionRequest(
                model=NAME, version=version, replicas=bundled.versions[0].replicas), metadata=metadata, timeout=30)
        await admin.SetTrafficSplit(admin_service_pb2.SetTrafficSplitRequest(model=NAME, weights=[
            admin_service_pb2.VersionWeight(version="v1", weight_permille=700),
            admin_service_pb2.VersionWeight(version="v2", weight_permille=300)]), metadata=metadata, timeout=10)
    usd = "USD"
    async with operator_channel(load_endpoint(mesh.data_dir).billing, billing_token(mesh.data_dir)) as channel:
        await billing_service_pb2_grpc.BillingServiceStub(channel).CreatePrice(billing_service_pb2.CreatePriceRequest(
            price=billing_service_pb2.Price(
                model=NAME, input_per_million=money_pb2.Money(currency_code=usd, micros=50_000),
                output_per_million=money_pb2.Money(currency_code=usd, micros=100_000)), actor="test"), timeout=10)


async def test_an_operator_deprecates_and_retires_a_version_with_the_cli_and_clients_see_it(mesh: Mesh) -> None:
    await register_two_versions(mesh)
    moved = autoglm(mesh, "models", "set-state", f"{NAME}@v2", "deprecated", "--reason", "superseded by v1",
                    "--operator", "alice")
    assert moved.returncode == 0, moved.stderr
    assert "v1  ACTIVE  weight 1000/1000  stable" in moved.stdout and "v2  DEPRECATED  weight 0/1000" in moved.stdout

    key = (mesh.data_dir / "demo_api_key").read_text().strip()
    client = openai.OpenAI(base_url=mesh.openai_base_url, api_key=key, max_retries=0,
                           http_client=httpx.Client(verify=ssl.create_default_context(cafile=mesh.ca_cert),
                                                    timeout=120))
    unpinned = {(client.completions.create(model=NAME, prompt=f"Count to {i}.", max_tokens=1,
                                           temperature=0).model_extra or {})["model_version"] for i in range(12)}
    assert unpinned == {"v1"}
    raw = client.chat.completions.with_raw_response.create(
        model=f"{NAME}@v2", messages=[{"role": "user", "content": "Hi"}], max_tokens=1)
    assert raw.headers["deprecation"].startswith("@") and int(raw.headers["deprecation"][1:]) > 0
    assert f"{NAME}@v2 is DEPRECATED since" in raw.headers["x-autoglm-deprecation"]
    assert (raw.parse().model_extra or {})["model_version"] == "v2"

    assert autoglm(mesh, "models", "set-state", f"{NAME}@v2", "retired", "--reason", "no callers left",
                   "--operator", "alice").returncode == 0
    with pytest.raises(openai.BadRequestError) as refused:
        client.completions.create(model=f"{NAME}@v2", prompt="Hi", max_tokens=1)
    assert f"{NAME}@v2 is RETIRED" in refused.value.message
    undo = autoglm(mesh, "models", "set-state", f"{NAME}@v2", "active", "--reason", "undo", "--operator", "bob")
    assert undo.returncode == 1
    assert f"FAILED_PRECONDITION: version {NAME}@v2 is RETIRED: it cannot move to ACTIVE" in undo.stderr

    listed = autoglm(mesh, "models")
    assert listed.returncode == 0 and "v2  RETIRED  weight 0/1000" in listed.stdout, listed.stdout
    history = autoglm(mesh, "models", "history", NAME)
    assert history.returncode == 0, history.stderr
    assert "ACTIVE -> DEPRECATED  by alice: superseded by v1" in history.stdout
    assert "DEPRECATED -> RETIRED  by alice: no callers left" in history.stdout
    as_json = json.loads(autoglm(mesh, "models", "history", NAME, "--format", "json").stdout)
    v2 = next(v for v in as_json["versions"] if v["version"] == "v2")
    assert [(c.get("from_state", ""), c["to_state"]) for c in v2["history"]] == [
        ("", "ACTIVE"), ("ACTIVE", "DEPRECATED"), ("DEPRECATED", "RETIRED")]
    audit = json.loads(autoglm(mesh, "audit", "--action", "model.state", "--format", "json").stdout)
    assert [(e["actor"], e["details"]["to"], e["details"]["reason"]) for e in audit] == [
        ("alice", "RETIRED", "no callers left"), ("alice", "DEPRECATED", "superseded by v1")]
