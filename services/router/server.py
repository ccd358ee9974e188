"""Builds the router's gRPC server."""

from __future__ import annotations

from collections.abc import Sequence

import grpc

from autoglm.router.v1 import admin_service_pb2, admin_service_pb2_grpc, router_service_pb2, router_service_pb2_grpc
from services.common.error_mapping import status_code_for
from services.common.grpc_server import RunningServer, start_server
from services.router.app import RouterApp
from services.router.config import RouterConfig
from services.router.servicer import AdminServicer, RouterServicer


async def build_server(config: RouterConfig) -> RunningServer:
    app = RouterApp(config, status_name=lambda error: status_code_for(error).name)
    await app.start()

    def register(server: grpc.aio.Server) -> Sequence[str]:
        router_service_pb2_grpc.add_RouterServiceServicer_to_server(RouterServicer(app), server)
        admin_service_pb2_grpc.add_AdminServiceServicer_to_server(AdminServicer(app), server)
        return [
            router_service_pb2.DESCRIPTOR.services_by_name["RouterService"].full_name,
            admin_service_pb2.DESCRIPTOR.services_by_name["AdminService"].full_name,
        ]

    try:
        running = await start_server("router", register, host=config.server.host, port=config.server.port)
    except BaseException:
        await app.close()
        raise
    running.on_stop.append(app.close)
    return running
