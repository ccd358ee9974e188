"""Builds the router's gRPC server and, when `http_port` is set, its OpenAI-compatible HTTP API on the same
event loop and gateway. `RPC_AUTH` declares every method's authentication (see `rpc_auth.py`)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2

from autoglm.router.v1 import admin_service_pb2, admin_service_pb2_grpc, router_service_pb2, router_service_pb2_grpc
from services.common.error_mapping import status_code_for
from services.common.grpc_server import DEFAULT_OPTIONS, RunningServer, start_server
from services.router.app import RouterApp, admin_token_of
from services.router.auth.api_keys import load_or_create_secret_file
from services.router.config import RouterConfig
from services.router.http.app import HttpSettings, build_app
from services.router.http.console.live import LiveSeries
from services.router.http.console.routes import Console
from services.router.http.console.session import Sessions
from services.router.http.serve import start_http
from services.router.rpc_auth import Auth, auth_wrapper, check_declared, declare, open_service
from services.router.servicer import AdminServicer, RouterServicer

ROUTER_SERVICE = router_service_pb2.DESCRIPTOR.services_by_name["RouterService"]
ADMIN_SERVICE = admin_service_pb2.DESCRIPTOR.services_by_name["AdminService"]
SERVED = (ROUTER_SERVICE, ADMIN_SERVICE)
KEY, ADMIN = Auth.API_KEY, Auth.ADMIN_TOKEN

# Every method the router serves and who may call it: a method missing here keeps the server from starting.
RPC_AUTH: dict[str, Auth] = {
    **declare(ROUTER_SERVICE, Generate=KEY, Complete=KEY, RunTask=KEY, CountTokens=KEY, ListModels=KEY,
              SubmitBatch=KEY, GetJob=KEY, ListJobs=KEY, CancelJob=KEY, SubmitWorkflow=KEY, GetWorkflow=KEY,
              ListWorkflows=KEY, CancelWorkflow=KEY, WatchWorkflow=KEY),
    **declare(ADMIN_SERVICE, CreateApiKey=ADMIN, ListApiKeys=ADMIN, RevokeApiKey=ADMIN, RegisterModelVersion=ADMIN,
              SetTrafficSplit=ADMIN, PromoteVersion=ADMIN, RollbackVersion=ADMIN, GetModel=ADMIN, SetPolicy=ADMIN,
              GetPolicy=ADMIN, ListAuditEvents=ADMIN, SetVersionState=ADMIN),
    **open_service(health_pb2.DESCRIPTOR.services_by_name["Health"]),
    **open_service(reflection_pb2.DESCRIPTOR.services_by_name["ServerReflection"]),
}

# Room above max_request_bytes for the other fields' framing, so the router's own size limits answer
# (INVALID_ARGUMENT naming the limit) rather than gRPC's receive limit (RESOURCE_EXHAUSTED).
RECEIVE_HEADROOM = 1024 * 1024


def server_options(config: RouterConfig) -> list[tuple[str, int]]:
    """The shared server options, with a receive limit of at least max_request_bytes + headroom."""
    receive = max(dict(DEFAULT_OPTIONS)["grpc.max_receive_message_length"], config.max_request_bytes + RECEIVE_HEADROOM)
    return [(k, receive if k == "grpc.max_receive_message_length" else v) for k, v in DEFAULT_OPTIONS]


def console_of(config: RouterConfig) -> Console:
    """The console's sessions (a secret made on first start in data_dir; the admin and operator-read tokens)."""
    read = config.operator_read_token
    if not read and config.operator_read_token_file:
        read = Path(config.operator_read_token_file).read_text().strip()
        if len(read) < 16:
            raise ValueError(f"{config.operator_read_token_file}: the operator-read token must be at least 16 characters")
    secret = load_or_create_secret_file(Path(config.data_dir) / "console_session_key")
    return Console(Sessions(secret, admin_token_of(config), read, config.console_session_s), LiveSeries())


async def build_server(config: RouterConfig) -> RunningServer:
    check_declared(RPC_AUTH, SERVED)
    app = RouterApp(config, status_name=lambda error: status_code_for(error).name)
    await app.start()

    def register(server: grpc.aio.Server) -> Sequence[str]:
        router_service_pb2_grpc.add_RouterServiceServicer_to_server(RouterServicer(app), server)
        admin_service_pb2_grpc.add_AdminServiceServicer_to_server(AdminServicer(app.admin), server)
        return [service.full_name for service in SERVED]

    http = None
    console = console_of(config) if config.console and config.http_port else None
    live = asyncio.create_task(console.live.run()) if console is not None else None
    try:
        if config.http_port:  # bound before gRPC reports SERVING, so a ready router answers both
            http = await start_http(build_app(app, HttpSettings(max_body_bytes=max(HttpSettings.max_body_bytes, config.max_request_bytes + RECEIVE_HEADROOM), body_timeout_s=config.http_body_timeout_s), console), config.http_host or config.server.host, config.http_port,
                                    config.http_tls_cert, config.http_tls_key, config.server.shutdown_grace_s)
        running = await start_server("router", register, host=config.server.host, port=config.server.port,
                                     options=server_options(config), wrap=auth_wrapper(RPC_AUTH, app.authenticator))
    except BaseException:
        if live is not None:
            live.cancel()
        if http is not None:
            await http.stop()
        await app.close()
        raise
    if http is not None:
        running.on_stop.append(http.stop)
    if live is not None:
        async def stop_live() -> None:
            live.cancel()

        running.on_stop.append(stop_live)
    running.on_stop.append(app.close)
    return running
