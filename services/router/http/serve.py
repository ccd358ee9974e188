"""Serve the HTTP API with uvicorn (httptools) on the running event loop, next to the gRPC server.

With a certificate it serves HTTPS (TLS 1.2 at least) and re-reads the certificate and key when their files
change (the launcher renews the mesh certificates in place while the mesh runs): new handshakes present
the new certificate, connections already open and their streams carry on. A pair caught between the
renames of a renewal (certificate and key not matching) is skipped until the next check. The protocol is
uvicorn's httptools one with a response's head written together with its body (`coalesce.py`)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from dataclasses import dataclass, field
from pathlib import Path

import structlog
import uvicorn
from fastapi import FastAPI
from uvicorn.config import create_ssl_context

from services.router.http.coalesce import CoalescingHttpToolsProtocol

log = structlog.get_logger(__name__)

CERT_CHECK_INTERVAL_S = 1.0


class ReloadingTls:
    """The listening socket's TLS context hands each new handshake to the context of the current files
    (through its SNI callback, which runs for every handshake, with or without SNI)."""

    def __init__(self, config: uvicorn.Config, listening: ssl.SSLContext) -> None:
        self._config = config
        self._paths = tuple(Path(p) for p in (config.ssl_certfile, config.ssl_keyfile) if p)
        self._stamp = self._current_stamp()
        _harden(listening)
        self.current = listening
        self.version = 0
        listening.sni_callback = self._pick

    def _pick(self, connection: ssl.SSLObject | ssl.SSLSocket, server_name: str | None,
              context: ssl.SSLContext) -> None:
        if self.current is not context:
            connection.context = self.current

    def _current_stamp(self) -> tuple[int, ...]:
        return tuple(p.stat().st_mtime_ns for p in self._paths)

    def check(self) -> bool:
        """Load the files if they changed; True when new handshakes now get a new certificate."""
        try:
            stamp = self._current_stamp()
            if stamp == self._stamp:
                return False
            c = self._config
            fresh = create_ssl_context(c.ssl_certfile or "", c.ssl_keyfile, c.ssl_keyfile_password, c.ssl_version,
                                       c.ssl_cert_reqs, c.ssl_ca_certs, c.ssl_ciphers)
        except (OSError, ssl.SSLError, ValueError) as exc:  # mid-renewal, or a file went away: keep the last one
            log.warning("https_certificate_not_reloaded", error=str(exc))
            return False
        _harden(fresh)
        self._stamp, self.current = stamp, fresh
        self.version += 1
        log.info("https_certificate_reloaded", certificate=str(self._paths[0]))
        return True

    async def watch(self, interval_s: float = CERT_CHECK_INTERVAL_S) -> None:
        while True:
            await asyncio.sleep(interval_s)
            self.check()


def _harden(context: ssl.SSLContext) -> None:
    context.minimum_version = ssl.TLSVersion.TLSv1_2  # TLS 1.3 preferred: the default maximum


@dataclass
class HttpServer:
    server: uvicorn.Server
    sock: socket.socket
    task: asyncio.Task[None]
    port: int
    tls: bool
    certificates: ReloadingTls | None = None
    watcher: asyncio.Task[None] | None = field(default=None, repr=False)

    async def stop(self) -> None:
        """Stop accepting, let open requests finish (up to the graceful timeout), close."""
        if self.watcher is not None:
            self.watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.watcher
        self.server.should_exit = True
        await self.task
        await self.server.shutdown(sockets=[self.sock])


async def start_http(app: FastAPI, host: str, port: int, certfile: str = "", keyfile: str = "",
                     grace: float = 5.0, cert_check_interval_s: float = CERT_CHECK_INTERVAL_S) -> HttpServer:
    """Bind `host:port` (0: a free port), TLS when a certificate is given, and serve `app` until stopped.

    uvicorn's startup and main loop are run here rather than `Server.serve()`, which would take over
    SIGINT/SIGTERM from the router (whose handler stops gRPC and HTTP together)."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    config = uvicorn.Config(app, http=CoalescingHttpToolsProtocol, lifespan="off", log_config=None, access_log=False,
                            ssl_certfile=certfile or None, ssl_keyfile=keyfile or None,
                            timeout_graceful_shutdown=max(1, int(grace)), server_header=False, proxy_headers=False)
    config.load()
    certificates = ReloadingTls(config, config.ssl) if config.ssl is not None else None
    server = uvicorn.Server(config)
    server.lifespan = config.lifespan_class(config)
    await server.startup(sockets=[sock])
    bound = int(sock.getsockname()[1])
    log.info("http_server_started", address=f"{host}:{bound}", tls=bool(certfile))
    watcher = asyncio.create_task(certificates.watch(cert_check_interval_s)) if certificates else None
    return HttpServer(server, sock, asyncio.create_task(server.main_loop()), bound, bool(certfile), certificates,
                      watcher)
