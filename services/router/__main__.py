"""`python -m services.router --port P [--config FILE] [--inference A,B] [--billing H:P] [--data-dir D]
[--http-port P [--http-tls-cert PEM --http-tls-key PEM]]`."""

from __future__ import annotations

from services.common.grpc_engine import default_to_iomgr

default_to_iomgr()  # before grpc loads: see services/common/grpc_engine.py

import argparse
from pathlib import Path

from services.billing.operators import TOKEN_FILE
from services.common.config import ServerSettings, apply_overrides, load_section
from services.common.grpc_server import RunningServer
from services.common.service_main import run_service
from services.router.config import DEFAULT_PORT, RouterConfig
from services.router.server import build_server

DEFAULT_BILLING = "127.0.0.1:50061"
DEFAULT_INFERENCE = "127.0.0.1:50071"


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--inference", default=None, help="comma-separated inference replicas host:port")
    parser.add_argument("--billing", default=None, help="billing host:port")
    parser.add_argument("--data-dir", type=Path, default=None, help="where the router keeps its SQLite files")
    parser.add_argument("--http-port", type=int, default=None, help="OpenAI-compatible HTTP API port (0: off)")
    parser.add_argument("--http-tls-cert", default=None, help="PEM certificate for HTTPS on --http-port")
    parser.add_argument("--http-tls-key", default=None, help="PEM key of --http-tls-cert")


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
    if args.billing:
        overrides["billing_target"] = args.billing
    elif not config.billing_target:
        overrides["billing_target"] = DEFAULT_BILLING
    for flag in ("http_port", "http_tls_cert", "http_tls_key"):
        if getattr(args, flag) is not None:
            overrides[flag] = getattr(args, flag)
    if args.data_dir:
        overrides["data_dir"] = args.data_dir
    elif "data_dir" not in section and mesh.get("data_dir"):
        overrides["data_dir"] = Path(str(mesh["data_dir"])).expanduser() / "router"
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
