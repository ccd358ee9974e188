"""Serve the HTTP API with uvicorn (httptools) on the running event loop, next to the gRPC server."""

from __future__ import annotations

import asyncio
import socket
from dataclasses import dataclass

import structlog
import uvicorn
from fastapi import FastAPI

log = structlog.get_logger(__name__)


@dataclass
class HttpServer:
    server: uvicorn.Server
    sock: socket.socket
    task: asyncio.Task[None]
    port: int
    tls: bool

    async def stop(self) -> None:
        """Stop accepting, let open requests finish (up to the graceful timeout), close."""
        self.server.should_exit = True
        await self.task
        await self.server.shutdown(sockets=[self.sock])


async def start_http(app: FastAPI, host: str, port: int, certfile: str = "", keyfile: str = "",
                     grace: float = 5.0) -> HttpServer:
    """Bind `host:port` (0: a free port), TLS when a certificate is given, and serve `app` until stopped.

    uvicorn's startup and main loop are run here rather than `Server.serve()`, which would take over
    SIGINT/SIGTERM from the router (whose handler stops gRPC and HTTP together)."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    config = uvicorn.Config(app, http="httptools", lifespan="off", log_config=None, access_log=False,
                            ssl_certfile=certfile or None, ssl_keyfile=keyfile or None,
                            timeout_graceful_shutdown=max(1, int(grace)), server_header=False, proxy_headers=False)
    config.load()
    server = uvicorn.Server(config)
    server.lifespan = config.lifespan_class(config)
    await server.startup(sockets=[sock])
    bound = int(sock.getsockname()[1])
    log.info("http_server_started", address=f"{host}:{bound}", tls=bool(certfile))
    return HttpServer(server, sock, asyncio.create_task(server.main_loop()), bound, bool(certfile))
