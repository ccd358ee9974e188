"""`python -m services.router`: run the router."""

from __future__ import annotations

import argparse

from services.common.config import ServerSettings
from services.common.grpc_server import RunningServer
from services.common.service_main import run_service
from services.router.config import DEFAULT_PORT, RouterConfig
from services.router.server import build_server


async def _build(settings: ServerSettings, args: argparse.Namespace) -> RunningServer:
    return await build_server(RouterConfig(server=settings))


if __name__ == "__main__":
    run_service("router", DEFAULT_PORT, _build)
