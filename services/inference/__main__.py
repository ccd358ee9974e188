"""`python -m services.inference`: run one inference replica."""

from __future__ import annotations

from services.common.grpc_engine import default_to_iomgr

default_to_iomgr()  # before grpc loads: see services/common/grpc_engine.py

import argparse
import sys
from dataclasses import replace
from pathlib import Path

from services.common.config import ServerSettings, apply_overrides, load_section
from services.common.errors import DomainError
from services.common.grpc_server import RunningServer
from services.common.service_main import run_service
from services.inference.config import DEFAULT_PORT, SERVED_PRECISIONS, InferenceConfig, replica_overrides
from services.inference.engine.model import load_model
from services.inference.server import build_server


def config_from_args(settings: ServerSettings, args: argparse.Namespace) -> InferenceConfig:
    config = apply_overrides(InferenceConfig(server=settings), replica_overrides(load_section(args.config, "inference")))
    flags = {"replica_id": args.replica_id, "model_dir": args.model_dir, "max_batch_size": args.max_batch_size,
             "intra_op_threads": args.threads, "provider": args.provider, "precision": args.precision,
             "billing": args.billing}
    return replace(config, **{k: v for k, v in flags.items() if v is not None})


async def _build(settings: ServerSettings, args: argparse.Namespace) -> RunningServer:
    config = config_from_args(settings, args)
    try:
        model = load_model(config.model_dir, config.session, config.verify_model, config.precision)
    except DomainError as err:
        print(f"inference: {err.message}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    return await build_server(config, model)


def _arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--replica-id", default=None, help="stable id of this replica in load reports")
    parser.add_argument("--model-dir", type=Path, default=None,
                        help="a built model directory (default: the latest build in the model cache)")
    parser.add_argument("--precision", choices=list(SERVED_PRECISIONS), default=None,
                        help="serve the int8 (default) or int4 build from the model cache; with --model-dir, "
                             "the build there must be of this precision")
    parser.add_argument("--max-batch-size", type=int, default=None, help="sequences decoded together (16)")
    parser.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads (0 = cores)")
    parser.add_argument("--billing", default=None,
                        help="billing's address (host:port) for engine-side metering of finished sequences "
                             "(default: none, nothing is reported)")
    parser.add_argument("--provider", choices=["auto", "cuda", "cpu"], default=None,
                        help="execution provider (auto: CUDA when available)")


if __name__ == "__main__":
    run_service("inference", DEFAULT_PORT, _build, _arguments)
