"""Which router and which TLS settings the client and admin commands use."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from services.cli.endpoint import router_target


@pytest.fixture
def mesh_dir(tmp_path: Path) -> Path:
    (tmp_path / "ca.pem").write_text("-----BEGIN CERTIFICATE-----\n-----END CERTIFICATE-----\n")
    (tmp_path / "endpoint.json").write_text(json.dumps(
        {"router": "127.0.0.1:6001", "tls": True, "ca_cert": str(tmp_path / "ca.pem")}))
    return tmp_path


def test_the_local_mesh_router_is_reached_over_tls_with_its_ca(mesh_dir: Path) -> None:
    address, credentials = router_target(mesh_dir, None, None, plaintext=False)
    assert address == "127.0.0.1:6001" and credentials is not None


def test_another_router_is_plaintext_unless_given_a_ca(mesh_dir: Path) -> None:
    assert router_target(mesh_dir, "10.0.0.9:443", None, plaintext=False) == ("10.0.0.9:443", None)
    address, credentials = router_target(mesh_dir, "10.0.0.9:443", str(mesh_dir / "ca.pem"), plaintext=False)
    assert address == "10.0.0.9:443" and credentials is not None


def test_plaintext_wins_and_no_mesh_means_the_default_port(tmp_path: Path, mesh_dir: Path) -> None:
    assert router_target(mesh_dir, None, None, plaintext=True) == ("127.0.0.1:6001", None)
    assert router_target(tmp_path / "nothing-here", None, None, plaintext=False) == ("127.0.0.1:50051", None)


def test_a_missing_ca_file_is_named(mesh_dir: Path) -> None:
    with pytest.raises(SystemExit, match="no such file"):
        router_target(mesh_dir, None, str(mesh_dir / "missing.pem"), plaintext=False)
