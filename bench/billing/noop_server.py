"""The anchor of the billing benchmark: a BillingService that does nothing, served exactly the way billing
is. `Reserve` answers an empty response; `StreamUsage` acks each event at once; no database.

Everything but the work is billing's: its own process started like billing's (`python -m ...`, port file),
the same grpc core I/O path (`services.common.grpc_engine`, chosen before grpc loads), the same event
loop (`run_service`: uvloop), the same server factory (`services.common.grpc_server.start_server`: the
same channel options, the per-method tracing, metrics and error-mapping wrappers, health and reflection).
What a call costs here is what billing's gRPC path alone costs on this machine.

    python -m bench.billing.noop_server --port 0 --port-file PATH
"""

from __future__ import annotations

from services.common.grpc_engine import default_to_iomgr

default_to_iomgr()  # before grpc loads, as services/billing/__main__.py does

import argparse
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import grpc

from autoglm.billing.v1 import billing_service_pb2 as pb2
from autoglm.billing.v1 import billing_service_pb2_grpc as pb2_grpc
from services.common.config import ServerSettings
from services.common.grpc_server import RunningServer, start_server
from services.common.service_main import run_service


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


def _arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--port-file", type=Path, required=True, help="write the bound port here once serving")


async def _build(settings: ServerSettings, args: argparse.Namespace) -> RunningServer:
    def register(server: grpc.aio.Server) -> Sequence[str]:
        pb2_grpc.add_BillingServiceServicer_to_server(NoopBilling(), server)
        return [pb2.DESCRIPTOR.services_by_name["BillingService"].full_name]

    running = await start_server("billing-noop", register, host=settings.host, port=settings.port)
    tmp = args.port_file.with_suffix(".tmp")
    tmp.write_text(str(running.port))
    tmp.replace(args.port_file)
    return running


if __name__ == "__main__":
    run_service("billing-noop", 0, _build, add_arguments=_arguments)
