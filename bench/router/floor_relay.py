"""The benchmark's floor: the least a grpc.aio router can do for a `Complete` — take the call, stream
`Generate` from the inference replica, join the deltas and answer. No keys, limits, budget hold, cache,
registry, usage event, access log, trace context or metrics. Whatever the router adds above this is its
own; this much any grpc.aio service in the request's path pays on this machine.
Argv: PORT INFERENCE_ADDRESS; prints "ready"."""

from __future__ import annotations

from services.common.grpc_engine import default_to_iomgr

default_to_iomgr()  # the same grpc I/O path as the router

import sys  # noqa: E402

import grpc  # noqa: E402
import uvloop  # noqa: E402

from autoglm.common.v1 import generation_pb2  # noqa: E402
from autoglm.inference.v1 import inference_service_pb2 as inf_pb2  # noqa: E402
from autoglm.inference.v1 import inference_service_pb2_grpc as inf_grpc  # noqa: E402
from autoglm.router.v1 import router_service_pb2 as pb2  # noqa: E402
from autoglm.router.v1 import router_service_pb2_grpc as pb2_grpc  # noqa: E402


class FloorRouter(pb2_grpc.RouterServiceServicer):
    def __init__(self, inference: str) -> None:
        self._stub = inf_grpc.InferenceServiceStub(grpc.aio.insecure_channel(inference))

    async def Complete(self, request: pb2.CompleteRequest, context: grpc.aio.ServicerContext) -> pb2.CompleteResponse:
        upstream = inf_pb2.GenerateRequest(request_id="floor", prompt=request.prompt, messages=request.messages,
                                           sampling=request.sampling)
        parts: list[str] = []
        reply = inf_pb2.GenerateResponse()
        async for reply in self._stub.Generate(upstream):
            parts.append(reply.delta)
        return pb2.CompleteResponse(choices=[pb2.Choice(text="".join(parts), finish_reason=reply.finish_reason)],
                                    usage=generation_pb2.Usage(prompt_tokens=reply.usage.prompt_tokens,
                                                               completion_tokens=reply.usage.completion_tokens))


async def main(port: int, inference: str) -> None:
    server = grpc.aio.server()
    pb2_grpc.add_RouterServiceServicer_to_server(FloorRouter(inference), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    print("ready", flush=True)
    await server.wait_for_termination()


if __name__ == "__main__":
    uvloop.run(main(int(sys.argv[1]), sys.argv[2]))
