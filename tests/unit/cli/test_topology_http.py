"""Where `autoglm up` serves the OpenAI-compatible API: on the router itself, HTTPS with the router's mesh
certificate behind the Python sidecar, through the router's Envoy with `--sidecar envoy` (TLS at Envoy,
plain HTTP to the router on loopback), plaintext with `--sidecar none`, not at all with `http_port: 0`."""

from __future__ import annotations

from pathlib import Path

import yaml

from services.cli.mesh_config import MeshConfig
from services.cli.topology import plan


def router_argv(mesh: MeshConfig, sidecar: str) -> list[str]:
    return next(s.argv for s in plan(mesh, None, sidecar).specs if s.name == "router")


def test_behind_the_python_sidecar_the_router_serves_https_with_its_mesh_certificate(tmp_path: Path) -> None:
    mesh = MeshConfig(data_dir=tmp_path, router_http_port=18443)
    argv = router_argv(mesh, "python")
    assert argv[argv.index("--http-port") + 1] == "18443"
    assert argv[argv.index("--http-tls-cert") + 1] == str(tmp_path / "certs" / "router.pem")
    assert argv[argv.index("--http-tls-key") + 1] == str(tmp_path / "certs" / "router.key")
    assert plan(mesh, None, "python").openai_base_url == "https://127.0.0.1:18443/v1"


def test_with_envoy_the_routers_envoy_owns_the_https_port_and_forwards_to_the_router_in_plain_http(
        tmp_path: Path) -> None:
    mesh = MeshConfig(data_dir=tmp_path, router_http_port=18443)
    top = plan(mesh, None, "envoy")
    argv = next(s.argv for s in top.specs if s.name == "router")
    internal = int(argv[argv.index("--http-port") + 1])
    assert internal != 18443 and "--http-tls-cert" not in argv and "--http-tls-key" not in argv
    assert top.openai_base_url == "https://127.0.0.1:18443/v1"
    envoy = next(s.argv for s in top.specs if s.name == "router-sidecar")
    bootstrap = yaml.safe_load(Path(envoy[envoy.index("-c") + 1]).read_text())
    http = next(x for x in bootstrap["static_resources"]["listeners"] if x["name"] == "http")
    assert http["address"]["socket_address"] == {"address": "127.0.0.1", "port_value": 18443}
    assert "transport_socket" in http["filter_chains"][0]
    cluster = next(c for c in bootstrap["static_resources"]["clusters"] if c["name"] == "local_http")
    endpoint = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]
    assert endpoint["socket_address"] == {"address": "127.0.0.1", "port_value": internal}
    others = [s.argv for s in top.specs if s.name != "router-sidecar" and s.argv[0].endswith("envoy")]
    for argv in others:  # only the router's public edge fronts the HTTP API
        doc = yaml.safe_load(Path(argv[argv.index("-c") + 1]).read_text())
        assert all(x["name"] != "http" for x in doc["static_resources"]["listeners"])


def test_without_sidecars_it_is_plaintext_and_port_0_turns_it_off(tmp_path: Path) -> None:
    argv = router_argv(MeshConfig(data_dir=tmp_path, router_http_port=18080), "none")
    assert "--http-port" in argv and "--http-tls-cert" not in argv
    assert plan(MeshConfig(data_dir=tmp_path, router_http_port=18080), None, "none").openai_base_url == \
        "http://127.0.0.1:18080/v1"
    off = MeshConfig(data_dir=tmp_path, router_http_port=0)
    assert "--http-port" not in router_argv(off, "python") and plan(off, None, "python").openai_base_url == ""


def test_the_mesh_file_sets_the_port(tmp_path: Path) -> None:
    path = tmp_path / "mesh.yaml"
    path.write_text("router:\n  port: 50051\n  http_port: 9443\n")
    assert MeshConfig.load(path).router_http_port == 9443
    assert MeshConfig.load(Path(__file__).parents[3] / "deploy/local/mesh.yaml").router_http_port == 8443
