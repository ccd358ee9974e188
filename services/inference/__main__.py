"""`python -m services.inference`: run one inference replica."""

from __future__ import annotations

import argparse

from services.common.config import ServerSettings
from services.common.grpc_server import RunningServer
from services.common.service_main import run_service
from services.inference.config import DEFAULT_PORT, InferenceConfig
from services.inference.server import build_server


async def _build(settings: ServerSettings, args: argparse.Namespace) -> RunningServer:
    return await build_server(InferenceConfig(server=settings, replica_id=args.replica_id))


def _arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--replica-id", default="inference-0", help="stable id of this replica in load reports")


if __name__ == "__main__":
    run_service("inference", DEFAULT_PORT, _build, _arguments)
