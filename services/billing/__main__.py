"""`python -m services.billing`: run billing."""

from __future__ import annotations

import argparse

from services.common.config import ServerSettings
from services.common.grpc_server import RunningServer
from services.common.service_main import run_service
from services.billing.config import DEFAULT_PORT, BillingConfig
from services.billing.server import build_server


async def _build(settings: ServerSettings, args: argparse.Namespace) -> RunningServer:
    return await build_server(BillingConfig(server=settings))


if __name__ == "__main__":
    run_service("billing", DEFAULT_PORT, _build)
