"""`python -m services.router --port P [--config FILE] [--inference A,B] [--inference-via A=L,B=M]
[--billing H:P] [--data-dir D] [--shared-secrets-dir D] [--http-port P [--http-tls-cert PEM --http-tls-key PEM]]
[--database DSN] [--key-pepper-path F] [--admin-token-path F] [--rate-limit-redis-url URL]`."""

from __future__ import annotations

from services.common.grpc_engine import default_to_iomgr

default_to_iomgr()  # before grpc loads: see services/common/grpc_engine.py

import argparse
from pathlib import Path

from services.billing.operators import TOKEN_FILE
from services.common.config import ServerSettings, apply_overrides, load_section
from services.common.grpc_server import RunningServer
from services.common.service_main import run_service
from services.router.auth.api_keys import load_or_create_secret_file
from services.router.config import DEFAULT_PORT, RouterConfig
from services.router.server import build_server

DEFAULT_BILLING = "127.0.0.1:50061"
DEFAULT_INFERENCE = "127.0.0.1:50071"


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--inference", default=None, help="comma-separated inference replicas host:port")
    parser.add_argument("--inference-via", default=None, metavar="ADDR=LOCAL[,ADDR=LOCAL]",
                        help="dial inference replica ADDR (as --inference and the registry name it) through LOCAL, "
                             "e.g. this router's own sidecar listener for it")
    parser.add_argument("--billing", default=None, help="billing host:port")
    parser.add_argument("--data-dir", type=Path, default=None, help="where the router keeps its SQLite files")
    parser.add_argument("--http-port", type=int, default=None, help="OpenAI-compatible HTTP API port (0: off)")
    parser.add_argument("--http-tls-cert", default=None, help="PEM certificate for HTTPS on --http-port")
    parser.add_argument("--http-tls-key", default=None, help="PEM key of --http-tls-cert")
    parser.add_argument("--database", default=None, help="postgresql://... shared by router replicas (router.database)")
    parser.add_argument("--key-pepper-path", default=None, help="file holding the API-key pepper (router.key_pepper_path)")
    parser.add_argument("--admin-token-path", default=None, help="file holding the admin token (router.admin_token_path)")
    parser.add_argument("--rate-limit-redis-url", default=None, help="Redis for rate limits shared by replicas")
    parser.add_argument("--shared-secrets-dir", type=Path, default=None,
                        help="read admin_token and key_pepper here instead of the data dir, unless the config "
                             "names them (router replicas of one mesh share the first router's)")


def config_from(settings: ServerSettings, args: argparse.Namespace) -> RouterConfig:
    section = dict(load_section(args.config, "router"))
    for launcher_key in ("port", "host", "metrics_port"):  # read by the launcher / shared flags
        section.pop(launcher_key, None)
    mesh = load_section(args.config, "mesh")
    if "inference_targets" in section:
        section["inference_targets"] = tuple(section["inference_targets"])
    if "data_dir" in section:
        section["data_dir"] = Path(section["data_dir"])
    config = apply_overrides(RouterConfig(server=settings), section)
    overrides: dict[str, object] = {}
    if args.inference:
        overrides["inference_targets"] = tuple(a.strip() for a in args.inference.split(",") if a.strip())
    elif not config.inference_targets:
        overrides["inference_targets"] = (DEFAULT_INFERENCE,)
    # (getattr: callers that build the namespace themselves may leave the newer flags out)
    if getattr(args, "inference_via", None):
        pairs = [p.strip().partition("=") for p in args.inference_via.split(",") if p.strip()]
        overrides["inference_dial"] = {name: local for name, _, local in pairs}
    if args.billing:
        overrides["billing_target"] = args.billing
    elif not config.billing_target:
        overrides["billing_target"] = DEFAULT_BILLING
    for flag in ("http_port", "http_tls_cert", "http_tls_key", "database", "key_pepper_path", "admin_token_path",
                 "rate_limit_redis_url"):
        if getattr(args, flag) is not None:
            overrides[flag] = getattr(args, flag)
    if args.data_dir:
        overrides["data_dir"] = args.data_dir
    elif "data_dir" not in section and mesh.get("data_dir"):
        overrides["data_dir"] = Path(str(mesh["data_dir"])).expanduser() / "router"
    if getattr(args, "shared_secrets_dir", None):
        if not config.key_pepper_path:
            overrides["key_pepper_path"] = str(args.shared_secrets_dir / "key_pepper")
        if not config.admin_token:
            overrides["admin_token"] = load_or_create_secret_file(args.shared_secrets_dir / "admin_token",
                                                                  text=True).decode()
    if not config.billing_operator_token and not config.billing_operator_token_file:
        billing = load_section(args.config, "billing")
        if billing.get("operator_token"):
            overrides["billing_operator_token"] = str(billing["operator_token"])
        else:  # the file billing reads (or makes): its operator_token_file, else <mesh.data_dir>/...
            overrides["billing_operator_token_file"] = str(billing.get("operator_token_file") or Path(
                str(mesh.get("data_dir") or ".autoglm")).expanduser() / TOKEN_FILE)
    return apply_overrides(config, overrides)


async def _build(settings: ServerSettings, args: argparse.Namespace) -> RunningServer:
    return await build_server(config_from(settings, args))


if __name__ == "__main__":
    run_service("router", DEFAULT_PORT, _build, _add_arguments)
