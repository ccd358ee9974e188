"""The anchor of the billing benchmark: a bare grpc.aio server of the same BillingService messages that does
nothing (no interceptors, no database). `Reserve` answers an empty response; `StreamUsage` acks each event
at once. What a call costs here is what Python gRPC alone costs on this machine.

    python -m bench.billing.noop_server --port-file PATH
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import grpc

from autoglm.billing.v1 import billing_service_pb2 as pb2
from autoglm.billing.v1 import billing_service_pb2_grpc as pb2_grpc


class NoopBilling(pb2_grpc.BillingServiceServicer):
    async def Reserve(self, request: pb2.ReserveRequest, context: grpc.aio.ServicerContext) -> pb2.ReserveResponse:
        return pb2.ReserveResponse()

    async def StreamUsage(self, request_iterator: AsyncIterator[pb2.StreamUsageRequest],
                          context: grpc.aio.ServicerContext) -> AsyncIterator[pb2.StreamUsageResponse]:
        async for request in request_iterator:
            if request.events:
                yield pb2.StreamUsageResponse(acks=[pb2.StreamUsageResponse(event_id=e.event_id)
                                                    for e in request.events])
            else:
                yield pb2.StreamUsageResponse(event_id=request.event.event_id)


async def main(port_file: Path) -> None:
    server = grpc.aio.server()
    pb2_grpc.add_BillingServiceServicer_to_server(NoopBilling(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    tmp = port_file.with_suffix(".tmp")
    tmp.write_text(str(port))
    tmp.replace(port_file)
    await server.wait_for_termination()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port-file", type=Path, required=True)
    asyncio.run(main(parser.parse_args().port_file))
