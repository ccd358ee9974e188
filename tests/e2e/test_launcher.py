"""`autoglm up` (what `make run` runs) as a user meets it: the mesh comes up, the banner's grpcurl
commands work against the router, every service reports SERVING, and Ctrl-C leaves no process behind."""

from __future__ import annotations

import subprocess

from tests.conftest import tool
from tests.e2e.mesh_process import start_mesh, stop_mesh


def grpcurl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([tool("grpcurl"), *args], capture_output=True, text=True, timeout=30)


def test_mesh_comes_up_answers_grpcurl_and_stops_cleanly(tmp_path, processes) -> None:
    mesh = start_mesh(tmp_path, processes)
    banner = "".join(mesh.output)
    assert mesh.router in banner and "grpcurl" in banner

    listed = grpcurl("-plaintext", mesh.router, "list")
    assert listed.returncode == 0, listed.stderr
    services = set(listed.stdout.split())
    assert {
        "autoglm.router.v1.RouterService",
        "autoglm.router.v1.AdminService",
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
    } <= services

    described = grpcurl("-plaintext", mesh.router, "describe", "autoglm.router.v1.RouterService")
    assert described.returncode == 0, described.stderr
    # Proto comments reach users through reflection.
    assert "Streams the answer as text deltas" in described.stdout

    for address in [mesh.router, mesh.billing, *mesh.inference]:
        health = grpcurl("-plaintext", "-d", '{"service": ""}', address, "grpc.health.v1.Health/Check")
        assert health.returncode == 0, health.stderr
        assert '"status": "SERVING"' in health.stdout, address

    children = mesh.descendants()
    assert len(children) >= 3, children
    assert stop_mesh(mesh) == 0
    assert mesh.descendants() == []
