"""Shared `python -m services.<name>` entry: parse flags, configure logs and traces, serve until SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Awaitable, Callable

try:
    import uvloop as _uvloop
except ImportError:  # pragma: no cover - uvloop is a dependency on every platform but Windows
    _uvloop = None  # type: ignore[assignment]

from services.common.config import ServerSettings, add_server_arguments, server_settings_from_args
from services.common.grpc_engine import prefer_iomgr_polling
from services.common.grpc_server import RunningServer, serve_until_signal
from services.common.logging import configure_logging
from services.common.metrics import start_metrics_endpoint
from services.common.tracing import configure_tracing

Builder = Callable[[ServerSettings, argparse.Namespace], Awaitable[RunningServer]]


def run_service(
    name: str,
    default_port: int,
    build: Builder,
    add_arguments: Callable[[argparse.ArgumentParser], None] | None = None,
    argv: list[str] | None = None,
) -> None:
    prefer_iomgr_polling()  # a no-op when the entry module chose before grpc loaded
    parser = argparse.ArgumentParser(prog=f"python -m services.{name}", description=f"Run the {name} service.")
    add_server_arguments(parser, default_port)
    if add_arguments:
        add_arguments(parser)
    args = parser.parse_args(argv)
    settings = server_settings_from_args(args)
    configure_logging(name, settings.log_level)
    configure_tracing(name, settings.otlp_endpoint)

    async def main() -> None:
        if settings.metrics_port is not None:
            metrics_port = start_metrics_endpoint(settings.metrics_port, settings.host)
            sys.stdout.write(f"{name} metrics on http://{settings.host}:{metrics_port}/metrics\n")
            sys.stdout.flush()
        running = await build(settings, args)
        sys.stdout.write(f"{name} listening on {settings.host}:{running.port}\n")  # one write: see logging.py
        sys.stdout.flush()
        await serve_until_signal(running, settings.shutdown_grace_s)

    # libuv's event loop (uvloop, where installed) costs less CPU per call than the default selector loop.
    with asyncio.Runner(loop_factory=_uvloop.new_event_loop if _uvloop is not None else None) as runner:
        runner.run(main())
