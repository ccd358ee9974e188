"""The benchmark's upstream: a minimal InferenceService (CountTokens echoes a count, Generate streams
N messages), run as its own process so its CPU is not counted as the proxy's. Prints its port."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator

import grpc

from autoglm.inference.v1 import inference_service_pb2 as pb
from autoglm.inference.v1 import inference_service_pb2_grpc as pb_grpc


class BenchInference(pb_grpc.InferenceServiceServicer):
    async def CountTokens(self, request: pb.CountTokensRequest, context: grpc.aio.ServicerContext
                          ) -> pb.CountTokensResponse:
        return pb.CountTokensResponse(token_count=len(request.prompt), context_window=2048)

    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
                       ) -> AsyncIterator[pb.GenerateResponse]:
        count = request.sampling.max_tokens if request.sampling.HasField("max_tokens") else 100
        for i in range(count):
            yield pb.GenerateResponse(delta="tok ", token_ids=[i])


async def main() -> None:
    server = grpc.aio.server()
    pb_grpc.add_InferenceServiceServicer_to_server(BenchInference(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(port, flush=True)
    await server.wait_for_termination()


if __name__ == "__main__":
    asyncio.run(main())
    sys.exit(0)
