"""Wait for a gRPC server's standard health service to answer SERVING."""

from __future__ import annotations

import asyncio
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


async def check_serving(address: str, service: str = "", timeout: float = 1.0,
                        credentials: grpc.ChannelCredentials | None = None) -> bool:
    channel = grpc.aio.secure_channel(address, credentials) if credentials else grpc.aio.insecure_channel(address)
    async with channel:
        try:
            reply = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout
            )
        except grpc.aio.AioRpcError:
            return False
    return reply.status == health_pb2.HealthCheckResponse.SERVING


async def wait_serving(address: str, deadline_s: float, is_alive: object = None) -> None:
    """Poll until SERVING; raise TimeoutError after `deadline_s`, RuntimeError if `is_alive()` turns false."""
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if callable(is_alive) and not is_alive():
            raise RuntimeError(f"process serving {address} exited before it became healthy")
        if await check_serving(address):
            return
        await asyncio.sleep(0.2)
    raise TimeoutError(f"{address} did not report SERVING within {deadline_s:.0f}s")


async def wait_listening(address: str, deadline_s: float, is_alive: object = None) -> None:
    """Poll until a TCP connect to `address` succeeds (for listeners that only speak mTLS)."""
    host, _, port = address.rpartition(":")
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if callable(is_alive) and not is_alive():
            raise RuntimeError(f"process listening on {address} exited before it was ready")
        try:
            _reader, writer = await asyncio.wait_for(asyncio.open_connection(host, int(port)), 1.0)
        except (OSError, TimeoutError):
            await asyncio.sleep(0.2)
            continue
        writer.close()
        await writer.wait_closed()
        return
    raise TimeoutError(f"{address} did not accept connections within {deadline_s:.0f}s")
