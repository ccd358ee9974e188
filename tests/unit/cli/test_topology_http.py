"""Where `autoglm up` serves the OpenAI-compatible API: on the router itself, HTTPS with the router's mesh
certificate behind a sidecar, plaintext with `--sidecar none`, not at all with `http_port: 0`."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.cli.mesh_config import MeshConfig
from services.cli.topology import plan


def router_argv(mesh: MeshConfig, sidecar: str) -> list[str]:
    return next(s.argv for s in plan(mesh, None, sidecar).specs if s.name == "router")


@pytest.mark.parametrize("sidecar", ["python", "envoy"])
def test_behind_a_sidecar_the_router_serves_https_with_its_mesh_certificate(tmp_path: Path, sidecar: str) -> None:
    mesh = MeshConfig(data_dir=tmp_path, router_http_port=18443)
    argv = router_argv(mesh, sidecar)
    assert argv[argv.index("--http-port") + 1] == "18443"
    assert argv[argv.index("--http-tls-cert") + 1] == str(tmp_path / "certs" / "router.pem")
    assert argv[argv.index("--http-tls-key") + 1] == str(tmp_path / "certs" / "router.key")
    assert plan(mesh, None, sidecar).openai_base_url == "https://127.0.0.1:18443/v1"


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
