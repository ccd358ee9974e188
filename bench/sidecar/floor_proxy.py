"""The benchmark's floor: the least a grpc.aio byte-forwarding proxy can do — mTLS inbound, one generic
handler that forwards unary calls as raw bytes with the caller's metadata and deadline, and nothing else
(no policy, authorization, trace context, access log or metrics). Whatever the sidecar costs above this is
its own; this much any grpc.aio proxy pays. Argv: CERTS_DIR PORT UPSTREAM; prints "ready"."""

from __future__ import annotations

from services.common.grpc_engine import default_to_iomgr

default_to_iomgr()  # the same grpc I/O path as the sidecar

import sys  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import grpc  # noqa: E402
import uvloop  # noqa: E402

HOP_BY_HOP = frozenset({"grpc-timeout", "te", "content-type", "user-agent"})


class Forward(grpc.GenericRpcHandler):
    def __init__(self, channel: grpc.aio.Channel) -> None:
        self._channel = channel
        self._handlers: dict[str, grpc.RpcMethodHandler] = {}

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        method: str = handler_call_details.method  # type: ignore[attr-defined]
        handler = self._handlers.get(method)
        if handler is None:
            upstream = self._channel.unary_unary(method)

            async def forward(request: bytes, context: grpc.aio.ServicerContext) -> Any:
                metadata = [(k, v) for k, v in context.invocation_metadata() or () if k not in HOP_BY_HOP]
                return await upstream(request, timeout=context.time_remaining(), metadata=metadata)

            handler = self._handlers[method] = grpc.unary_unary_rpc_method_handler(forward)
        return handler


async def main(certs: Path, port: int, upstream: str) -> None:
    channel = grpc.aio.insecure_channel(upstream)
    server = grpc.aio.server(handlers=[Forward(channel)])
    credentials = grpc.ssl_server_credentials(
        [((certs / "inference.key").read_bytes(), (certs / "inference.pem").read_bytes())],
        root_certificates=(certs / "ca.pem").read_bytes(), require_client_auth=True)
    server.add_secure_port(f"127.0.0.1:{port}", credentials)
    await server.start()
    print("ready", flush=True)
    await server.wait_for_termination()


if __name__ == "__main__":
    uvloop.run(main(Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3]))
