"""`autoglm` — the command line of Open-AutoGLM.

  autoglm up [--config FILE]          start the whole mesh in the foreground
  autoglm model build [PATH] [--precision int8|int4]   build (or reuse) an ONNX model from a GGUF or HF folder
  autoglm chat | generate             talk to the router
  autoglm models                      the models your key may call, with their state and default sampling
  autoglm models history|set-state    a model's version states and moves; move a version (admin token)
  autoglm keys create|list|revoke     manage API keys
  autoglm usage [--since 7d --by model]   tokens and cost from the ledger
  autoglm billing report | budget set|list | price set|list
  autoglm certs init|issue            the mesh CA and per-service identities
  autoglm sidecar run|render-envoy    run a sidecar, or render the policy as an Envoy bootstrap
  autoglm workflow run FILE.yaml | show ID | list | cancel ID   DAGs of tasks and generations
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

from services.cli.admin_commands import add_admin_commands
from services.cli.billing_commands import add_billing_commands
from services.cli.certs_commands import add_certs_commands
from services.cli.client_commands import add_client_commands
from services.cli.sidecar_commands import add_sidecar_commands
from services.cli.usage_commands import add_usage_commands
from services.cli.workflow_commands import add_workflow_commands
from services.common.logging import configure_logging


def _up(args: argparse.Namespace) -> int:
    from services.cli.launcher import run_mesh
    from services.cli.mesh_config import MeshConfig
    from services.cli.topology import check_sidecar

    try:
        mesh = MeshConfig.load(args.config)
        check_sidecar(mesh, args.sidecar)
    except ValueError as exc:
        print(f"autoglm up: {exc}", file=sys.stderr)
        return 2
    configure_logging("launcher", args.log_level, json=False)
    asyncio.run(run_mesh(mesh, args.config, args.sidecar))
    return 0


def _model_build(args: argparse.Namespace) -> int:
    try:
        from services.inference.modelbuild import build_model
    except ImportError as exc:  # the build toolchain is an optional extra
        print(f"autoglm model build needs the model-build extra: pip install 'open-autoglm[model-build]' ({exc})",
              file=sys.stderr)
        return 2
    path = build_model(args.path, args.cache_dir, args.force, precision=args.precision)
    print(path)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="autoglm", description="Open-AutoGLM: a self-hosted LLM serving mesh.")
    parser.add_argument("--log-level", default="INFO")
    sub = parser.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", help="start billing, inference and the router (with sidecars) in the foreground")
    up.add_argument("--config", type=Path, default=None, help="mesh YAML (default: built-in defaults)")
    up.add_argument("--sidecar", choices=["python", "envoy", "none"], default="python",
                    help="sidecar in front of each service (default python: mTLS between services)")
    up.set_defaults(func=_up)

    model = sub.add_parser("model", help="model tools")
    model_sub = model.add_subparsers(dest="model_command", required=True)
    build = model_sub.add_parser("build", help="build an INT8 (default) or INT4 ONNX model with a KV-cache into the "
                                               "model cache")
    build.add_argument("path", nargs="?", default=None, help="GGUF file or Hugging Face folder (default: bundled SmolLM2)")
    build.add_argument("--cache-dir", type=Path, default=None)
    build.add_argument("--force", action="store_true", help="rebuild even if a valid cached build exists")
    build.add_argument("--precision", choices=["int8", "int4"], default="int8",
                       help="int8 (default) or int4: the GGUF's Q4_1 blocks as 4-bit MatMulNBits; both builds "
                            "coexist in the cache")
    build.set_defaults(func=_model_build)

    add_client_commands(sub)
    add_admin_commands(sub)
    add_usage_commands(sub)
    add_billing_commands(sub)
    add_certs_commands(sub)
    add_sidecar_commands(sub)
    add_workflow_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
