"""`router.replicas: N` in the mesh file: N router processes behind the one public address, each with
outbound listeners of its own; refused without the shared PostgreSQL and Redis; one router by default,
started exactly as before."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from services.cli.main import main
from services.cli.mesh_config import MeshConfig
from services.cli.topology import plan

PG = "postgresql://autoglm@/autoglm?host=/tmp"
REDIS = "redis://127.0.0.1:6379/0"


def three(tmp_path: Path, **extra: object) -> MeshConfig:
    return MeshConfig(data_dir=tmp_path, router_replicas=3, router_database=PG, router_rate_limit_redis_url=REDIS,
                      router_http_port=18443, inference_replicas=2, **extra)  # type: ignore[arg-type]


def flag(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


@pytest.mark.parametrize(("router", "missing"), [
    ({"replicas": 3}, ["router.database", "router.rate_limit_redis_url"]),
    ({"replicas": 3, "database": "sqlite:///shared.db", "rate_limit_redis_url": REDIS}, ["router.database"]),
    ({"replicas": 2, "database": PG}, ["router.rate_limit_redis_url"]),
])
def test_several_routers_without_shared_state_are_refused_naming_what_is_missing(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], router: dict, missing: list[str]) -> None:
    path = tmp_path / "mesh.yaml"
    path.write_text(yaml.safe_dump({"mesh": {"data_dir": str(tmp_path)}, "router": router}))
    assert main(["up", "--config", str(path)]) == 2
    message = capsys.readouterr().err
    assert f"router.replicas is {router['replicas']}" in message
    for setting in missing:
        assert f"{setting}:" in message
    assert "Traceback" not in message


def test_several_routers_need_a_sidecar_to_balance_them(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "mesh.yaml"
    path.write_text(yaml.safe_dump({"mesh": {"data_dir": str(tmp_path)},
                                    "router": {"replicas": 2, "database": PG, "rate_limit_redis_url": REDIS}}))
    assert main(["up", "--config", str(path), "--sidecar", "none"]) == 2
    assert "--sidecar python or --sidecar envoy" in capsys.readouterr().err


def test_the_mesh_file_sets_the_replicas_and_the_default_is_one_router(tmp_path: Path) -> None:
    path = tmp_path / "mesh.yaml"
    path.write_text(yaml.safe_dump({"router": {"replicas": 3, "database": PG, "rate_limit_redis_url": REDIS}}))
    assert MeshConfig.load(path).router_replicas == 3
    shipped = MeshConfig.load(Path(__file__).resolve().parents[3] / "deploy" / "local" / "mesh.yaml")
    assert shipped.router_replicas == 1
    top = plan(MeshConfig(data_dir=tmp_path), None, "python")
    assert [s.name for s in top.specs if s.name.startswith("router")] == [
        "router-sidecar", "router-to-inference-0", "router"]
    edge = next(s.argv for s in top.specs if s.name == "router-sidecar")
    router = next(s.argv for s in top.specs if s.name == "router")
    assert flag(edge, "--upstream") == f"127.0.0.1:{flag(router, '--port')}" and "--tcp-balance" not in edge
    assert flag(router, "--http-port") == "8443" and "--shared-secrets-dir" not in router


def test_python_sidecar_edge_balances_grpc_and_https_across_every_router(tmp_path: Path) -> None:
    top = plan(three(tmp_path), None, "python")
    routers = {s.name: s.argv for s in top.specs if s.name in ("router", "router-1", "router-2")}
    assert len(routers) == 3
    edge = next(s.argv for s in top.specs if s.name == "router-sidecar")
    assert flag(edge, "--inbound-port") == "50051"
    assert flag(edge, "--upstream").split(",") == [f"127.0.0.1:{flag(a, '--port')}" for a in routers.values()]
    http_ports = [flag(a, "--http-port") for a in routers.values()]
    assert "18443" not in http_ports and len(set(http_ports)) == 3  # each router its own internal HTTPS port
    assert flag(edge, "--tcp-balance") == "18443=" + ",".join(f"127.0.0.1:{p}" for p in http_ports)
    for argv in routers.values():
        assert flag(argv, "--http-tls-cert").endswith("router.pem")
    # Router i: its own data dir (spool, journal), router 0's admin token and key pepper.
    assert flag(routers["router"], "--data-dir") == str(tmp_path / "router")
    assert flag(routers["router-2"], "--data-dir") == str(tmp_path / "router-2")
    assert flag(routers["router-2"], "--shared-secrets-dir") == str(tmp_path / "router")
    assert [r["grpc"] for r in top.routers] == [f"127.0.0.1:{flag(a, '--port')}" for a in routers.values()]


@pytest.mark.parametrize("sidecar", ["python", "envoy"])
def test_each_router_has_outbound_listeners_of_its_own(tmp_path: Path, sidecar: str) -> None:
    top = plan(three(tmp_path), None, sidecar)
    by_name = {s.name: s for s in top.specs}
    seen: set[str] = set()
    for name in ("router", "router-1", "router-2"):
        argv = by_name[name].argv
        billing = flag(argv, "--billing")
        # The registry's names for the replicas (their mesh addresses), each dialled through this router's own.
        assert flag(argv, "--inference") == "127.0.0.1:50071,127.0.0.1:50072"
        via = dict(pair.split("=") for pair in flag(argv, "--inference-via").split(","))
        inference = [via["127.0.0.1:50071"], via["127.0.0.1:50072"]]
        prefix = "router" if name == "router" else name
        billing_listener = "router-sidecar" if name == "router" else f"{name}-to-billing"
        assert by_name[billing_listener].ready_address == billing
        for i, address in enumerate(inference):
            assert by_name[f"{prefix}-to-inference-{i}"].ready_address == address
        assert not seen & {billing, *inference}
        seen |= {billing, *inference}
        if sidecar == "python":  # every listener speaks with the router's mesh identity
            assert flag(by_name[billing_listener].argv, "--service") == "router"


def test_envoy_edge_is_a_least_request_cluster_over_every_router_for_grpc_and_https(tmp_path: Path) -> None:
    top = plan(three(tmp_path), None, "envoy")
    envoy = next(s.argv for s in top.specs if s.name == "router-sidecar")
    bootstrap = yaml.safe_load(Path(flag(envoy, "-c")).read_text())
    clusters = {c["name"]: c for c in bootstrap["static_resources"]["clusters"]}
    routers = [s.argv for s in top.specs if s.name in ("router", "router-1", "router-2")]
    for name, ports in (("local", [flag(a, "--port") for a in routers]),
                        ("local_http", [flag(a, "--http-port") for a in routers])):
        cluster = clusters[name]
        assert cluster["lb_policy"] == "LEAST_REQUEST"
        endpoints = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]
        assert [e["endpoint"]["address"]["socket_address"]["port_value"] for e in endpoints] == [int(p) for p in ports]
        assert cluster["health_checks"]
    assert "grpc_health_check" in clusters["local"]["health_checks"][0]
    one = plan(MeshConfig(data_dir=tmp_path / "one", router_http_port=18443), None, "envoy")
    envoy = next(s.argv for s in one.specs if s.name == "router-sidecar")
    single = {c["name"]: c for c in yaml.safe_load(Path(flag(envoy, "-c")).read_text())["static_resources"]["clusters"]}
    assert single["local"].get("lb_policy", "ROUND_ROBIN") == "ROUND_ROBIN" and "health_checks" not in single["local"]
