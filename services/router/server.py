"""Builds the router's gRPC server and, when `http_port` is set, its OpenAI-compatible HTTP API on the same
event loop and gateway."""

from __future__ import annotations

from collections.abc import Sequence

import grpc

from autoglm.router.v1 import admin_service_pb2, admin_service_pb2_grpc, router_service_pb2, router_service_pb2_grpc
from services.common.error_mapping import status_code_for
from services.common.grpc_server import DEFAULT_OPTIONS, RunningServer, start_server
from services.router.app import RouterApp
from services.router.config import RouterConfig
from services.router.http.app import HttpSettings, build_app
from services.router.http.serve import start_http
from services.router.servicer import AdminServicer, RouterServicer

# Room above max_request_bytes for the other fields' framing, so the router's own size limits answer
# (INVALID_ARGUMENT naming the limit) rather than gRPC's receive limit (RESOURCE_EXHAUSTED).
RECEIVE_HEADROOM = 1024 * 1024


def server_options(config: RouterConfig) -> list[tuple[str, int]]:
    """The shared server options, with a receive limit of at least max_request_bytes + headroom."""
    receive = max(dict(DEFAULT_OPTIONS)["grpc.max_receive_message_length"], config.max_request_bytes + RECEIVE_HEADROOM)
    return [(k, receive if k == "grpc.max_receive_message_length" else v) for k, v in DEFAULT_OPTIONS]


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

    http = None
    try:
        if config.http_port:  # bound before gRPC reports SERVING, so a ready router answers both
            http = await start_http(build_app(app, HttpSettings(max_body_bytes=max(HttpSettings.max_body_bytes, config.max_request_bytes + RECEIVE_HEADROOM), body_timeout_s=config.http_body_timeout_s)), config.http_host or config.server.host, config.http_port,
                                    config.http_tls_cert, config.http_tls_key, config.server.shutdown_grace_s)
        running = await start_server("router", register, host=config.server.host, port=config.server.port,
                                     options=server_options(config))
    except BaseException:
        if http is not None:
            await http.stop()
        await app.close()
        raise
    if http is not None:
        running.on_stop.append(http.stop)
    running.on_stop.append(app.close)
    return running
