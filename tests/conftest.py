"""The one in-process server fixture every test uses, plus helpers for real subprocesses.

`serve(build)` awaits a `build_server(...)` coroutine (which binds port 0), yields the running
server, and stops it in `finally`. `channel(running)` opens a real grpc.aio channel to it.

`require_real_component` is the one way a test depends on a real server binary (PostgreSQL, Redis): it
skips when the binary is missing, unless `AUTOGLM_REQUIRE_REAL_SERVICES=1` (set by `.ci/run`), which
turns the skip into a failure, so CI cannot pass without the real components.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import grpc
import pytest

from services.common.grpc_server import RunningServer

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent

REQUIRE_REAL_SERVICES = "AUTOGLM_REQUIRE_REAL_SERVICES"

ServeFactory = Callable[[Awaitable[RunningServer]], Awaitable[RunningServer]]


def real_services_required() -> bool:
    """Whether a missing real component fails the run (AUTOGLM_REQUIRE_REAL_SERVICES set, not 0/false)."""
    return os.environ.get(REQUIRE_REAL_SERVICES, "").strip().lower() not in ("", "0", "false", "no")


def require_real_component(available: bool, component: str, install_hint: str) -> None:
    """Go on when `component` is available; otherwise skip the test, or fail it when real services are
    required (see the module docstring). `install_hint` tells the reader how to get the component."""
    if available:
        return
    message = f"{component} not found ({install_hint})"
    if real_services_required():
        pytest.fail(f"{message}; {REQUIRE_REAL_SERVICES}=1 requires it", pytrace=False)
    pytest.skip(message)


@pytest.fixture
async def serve() -> AsyncIterator[ServeFactory]:
    """Start servers in-process on port 0; every one started is stopped when the test ends."""
    running: list[RunningServer] = []

    async def start(build: Awaitable[RunningServer]) -> RunningServer:
        server = await build
        running.append(server)
        return server

    try:
        yield start
    finally:
        for server in reversed(running):
            await server.stop(grace=0)


@asynccontextmanager
async def channel(running: RunningServer) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(running.address) as chan:
        yield chan


def tool(name: str) -> str:
    """Path of a binary installed in the venv (grpcurl, envoy, autoglm)."""
    path = VENV_BIN / name
    if not path.exists():
        raise FileNotFoundError(f"{name} not found in {VENV_BIN}; run `make install`")
    return str(path)


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Processes a test starts; each is stopped by PID (SIGTERM, then SIGKILL) when the test ends."""
    started: list[subprocess.Popen[bytes]] = []
    try:
        yield started
    finally:
        for proc in reversed(started):
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
