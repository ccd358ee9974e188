"""Builds the billing service's gRPC server."""

from __future__ import annotations

from collections.abc import Sequence

import grpc

from autoglm.billing.v1 import billing_service_pb2, billing_service_pb2_grpc
from services.common.grpc_server import RunningServer, start_server
from services.billing.config import BillingConfig
from services.billing.servicer import BillingServicer


async def build_server(config: BillingConfig) -> RunningServer:
    def register(server: grpc.aio.Server) -> Sequence[str]:
        billing_service_pb2_grpc.add_BillingServiceServicer_to_server(BillingServicer(), server)
        return [billing_service_pb2.DESCRIPTOR.services_by_name["BillingService"].full_name]

    return await start_server("billing", register, host=config.server.host, port=config.server.port)
