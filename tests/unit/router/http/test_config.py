"""The router's HTTP settings: from the mesh file's router section and the launcher's flags, validated."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from services.common.config import ServerSettings
from services.router.__main__ import _add_arguments, config_from
from services.router.app import admin_token_of
from services.router.config import RouterConfig


def args(config: Path | None, **flags: object) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    _add_arguments(parser)
    base: dict[str, object] = {**vars(parser.parse_args([])), "config": config}
    return argparse.Namespace(**{**base, **flags})


def test_the_port_comes_from_the_router_section_and_flags_win(tmp_path: Path) -> None:
    path = tmp_path / "mesh.yaml"
    path.write_text("router:\n  port: 50051\n  http_port: 9443\n")
    assert config_from(ServerSettings(), args(path)).http_port == 9443
    flagged = config_from(ServerSettings(), args(path, http_port=7000, http_tls_cert="c.pem", http_tls_key="c.key"))
    assert (flagged.http_port, flagged.http_tls_cert, flagged.http_tls_key) == (7000, "c.pem", "c.key")
    assert config_from(ServerSettings(), args(None)).http_port == 0  # off unless asked for


@pytest.mark.parametrize("fields", [{"http_port": 70000}, {"http_port": -1}, {"http_tls_cert": "only.pem"}])
def test_bad_http_settings_are_refused_at_start(fields: dict[str, object]) -> None:
    with pytest.raises(ValueError, match="http_"):
        RouterConfig(**fields)  # type: ignore[arg-type]


def test_shared_state_comes_from_flags_as_the_kubernetes_manifests_pass_it(tmp_path: Path) -> None:
    token = tmp_path / "admin_token"
    token.write_text("s3cret-admin\n")
    config = config_from(ServerSettings(port=0), args(
        None, database="postgresql://u@db/router", key_pepper_path=str(tmp_path / "pepper"),
        admin_token_path=str(token), rate_limit_redis_url="redis://cache:6379/0"))
    assert (config.database, config.key_pepper_path, config.rate_limit_redis_url) == (
        "postgresql://u@db/router", str(tmp_path / "pepper"), "redis://cache:6379/0")

    assert admin_token_of(config) == "s3cret-admin"
    with pytest.raises(ValueError, match=r"admin_token_path .* is missing or empty"):
        admin_token_of(RouterConfig(admin_token_path=str(tmp_path / "absent")))
def test_the_console_finds_billings_operator_token_where_billing_keeps_it(tmp_path: Path) -> None:
    path = tmp_path / "mesh.yaml"
    path.write_text(f"mesh:\n  data_dir: {tmp_path / 'data'}\nrouter:\n  port: 50051\n")
    assert config_from(ServerSettings(), args(path)).billing_operator_token_file == str(
        tmp_path / "data" / "billing_operator_token")
    path.write_text("router:\n  port: 50051\nbilling:\n  operator_token_file: /run/secrets/billing\n")
    assert config_from(ServerSettings(), args(path)).billing_operator_token_file == "/run/secrets/billing"
    path.write_text("router:\n  port: 50051\nbilling:\n  operator_token: a-billing-operator-token\n")
    assert config_from(ServerSettings(), args(path)).billing_operator_token == "a-billing-operator-token"
    path.write_text("router:\n  port: 50051\n  billing_operator_token_file: /elsewhere\n")
    assert config_from(ServerSettings(), args(path)).billing_operator_token_file == "/elsewhere"


@pytest.mark.parametrize(("fields", "message"), [({"console_session_s": 10}, "console_session_s"),
                                                 ({"operator_read_token": "short"}, "operator_read_token")])
def test_bad_console_settings_are_refused_at_start(fields: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        RouterConfig(**fields)  # type: ignore[arg-type]
