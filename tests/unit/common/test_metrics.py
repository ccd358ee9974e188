"""Every service exposes Prometheus metrics: calls are counted by method and status code."""

from __future__ import annotations

import asyncio
import urllib.request
from collections.abc import Sequence

import grpc
import pytest

from services.common import errors
from services.common.grpc_server import start_server
from services.common.metrics import start_metrics_endpoint


async def test_rpc_outcomes_are_counted_on_the_metrics_endpoint(serve) -> None:
    async def fail(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        raise errors.InvalidInput("bad")

    async def ok(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return b"ok"

    def register(server: grpc.aio.Server) -> Sequence[str]:
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("test.Metered", {
            "Fail": grpc.unary_unary_rpc_method_handler(fail),
            "Ok": grpc.unary_unary_rpc_method_handler(ok),
        }),))
        return []

    port = start_metrics_endpoint(0)
    running = await serve(start_server("metered", register))
    async with grpc.aio.insecure_channel(running.address) as chan:
        for _ in range(3):
            assert await chan.unary_unary("/test.Metered/Ok")(b"", timeout=5) == b"ok"
        with pytest.raises(grpc.aio.AioRpcError):
            await chan.unary_unary("/test.Metered/Fail")(b"", timeout=5)

    body = await asyncio.to_thread(lambda: urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode())
    assert 'autoglm_rpc_handled_total{code="OK",method="/test.Metered/Ok",service="metered"} 3.0' in body
    assert 'autoglm_rpc_handled_total{code="INVALID_ARGUMENT",method="/test.Metered/Fail",service="metered"} 1.0' in body
    assert 'autoglm_rpc_duration_seconds_count{method="/test.Metered/Ok",service="metered"} 3.0' in body
