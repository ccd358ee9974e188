"""Small helpers to call Generate and collect a whole stream."""

from __future__ import annotations

from dataclasses import dataclass

from autoglm.common.v1 import generation_pb2
from autoglm.inference.v1 import inference_service_pb2 as pb2
from autoglm.inference.v1 import inference_service_pb2_grpc as pb2_grpc


@dataclass
class Result:
    text: str
    token_ids: list[int]
    messages: list[pb2.GenerateResponse]

    @property
    def last(self) -> pb2.GenerateResponse:
        return self.messages[-1]


def request(prompt: str = "", max_tokens: int = 8, **sampling: object) -> pb2.GenerateRequest:
    stream = sampling.pop("stream_options", None)
    traffic = sampling.pop("traffic_class", generation_pb2.TRAFFIC_CLASS_UNSPECIFIED)
    return pb2.GenerateRequest(
        prompt=prompt, sampling=generation_pb2.SamplingParams(max_tokens=max_tokens, **sampling),  # type: ignore[arg-type]
        stream_options=stream, traffic_class=traffic)  # type: ignore[arg-type]


async def generate(stub: pb2_grpc.InferenceServiceStub, req: pb2.GenerateRequest, timeout: float = 120) -> Result:
    messages = [m async for m in stub.Generate(req, timeout=timeout)]
    return Result("".join(m.delta for m in messages), [t for m in messages for t in m.token_ids], messages)
