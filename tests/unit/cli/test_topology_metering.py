"""`autoglm up` wires engine-side metering: each inference replica gets billing's address — its own
sidecar's outbound listener, whose only peer is billing — or billing's port without sidecars; off with
`inference.engine_metering: false`."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.cli.mesh_config import MeshConfig
from services.cli.topology import POLICY, ProcessSpec, plan
from sidecar.policy import load_policy


def spec(specs: list[ProcessSpec], name: str) -> ProcessSpec:
    return next(s for s in specs if s.name == name)


def flag(argv: list[str], name: str) -> str | None:
    return argv[argv.index(name) + 1] if name in argv else None


def test_each_replica_reports_through_its_own_sidecars_outbound_listener_to_billing(tmp_path: Path) -> None:
    mesh = MeshConfig(data_dir=tmp_path, inference_replicas=2)
    top = plan(mesh, None, "python")
    for i in range(2):
        replica, sidecar = spec(top.specs, f"inference-{i}").argv, spec(top.specs, f"inference-{i}-sidecar").argv
        outbound = flag(sidecar, "--outbound-port")
        assert outbound is not None and int(outbound) > 0
        assert flag(replica, "--billing") == f"127.0.0.1:{outbound}"
        assert flag(sidecar, "--peer") == f"billing=127.0.0.1:{mesh.billing_port}"
        assert (flag(sidecar, "--service"), flag(sidecar, "--inbound-port")) == ("inference",
                                                                                str(mesh.inference_base_port + i))


def test_envoy_replicas_get_an_outbound_listener_too(tmp_path: Path) -> None:
    top = plan(MeshConfig(data_dir=tmp_path), None, "envoy")
    billing = flag(spec(top.specs, "inference-0").argv, "--billing")
    assert billing is not None
    config = Path(str(flag(spec(top.specs, "inference-0-sidecar").argv, "-c"))).read_text()
    assert f"port_value: {billing.rsplit(':', 1)[1]}" in config


@pytest.mark.parametrize("sidecar", ["none", "python"])
def test_metering_can_be_turned_off_and_without_sidecars_replicas_dial_billing(tmp_path: Path, sidecar: str) -> None:
    mesh = MeshConfig(data_dir=tmp_path)
    on = flag(spec(plan(mesh, None, sidecar).specs, "inference-0").argv, "--billing")
    if sidecar == "none":
        assert on == f"127.0.0.1:{mesh.billing_port}"
    off = MeshConfig(data_dir=tmp_path, engine_metering=False)
    assert flag(spec(plan(off, None, sidecar).specs, "inference-0").argv, "--billing") is None


def test_the_mesh_policy_lets_inference_call_only_report_engine_usage_on_billing() -> None:
    policy = load_policy(POLICY)
    assert policy.allowed("inference", "billing", "/autoglm.billing.v1.BillingService/ReportEngineUsage")
    for method in ("Reserve", "Settle", "RecordUsage", "StreamUsage", "AcquireLeases", "CreateBudget"):
        assert not policy.allowed("inference", "billing", f"/autoglm.billing.v1.BillingService/{method}"), method
    assert not policy.allowed("inference", "router", "/autoglm.router.v1.RouterService/Generate")
