"""gRPC servicer of the inference service: thin conversions around the engine."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from autoglm.inference.v1 import inference_service_pb2 as pb2
from autoglm.inference.v1 import inference_service_pb2_grpc as pb2_grpc
from services.common.errors import NotImplementedYet


def _missing(rpc: str, what: str) -> NotImplementedYet:
    return NotImplementedYet(f"{rpc} is not available in this build: {what} is not implemented yet")


class InferenceServicer(pb2_grpc.InferenceServiceServicer):
    async def Generate(
        self, request: pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb2.GenerateResponse]:
        raise _missing("InferenceService.Generate", "the ONNX generation engine")
        yield  # pragma: no cover

    async def CountTokens(
        self, request: pb2.CountTokensRequest, context: grpc.aio.ServicerContext
    ) -> pb2.CountTokensResponse:
        raise _missing("InferenceService.CountTokens", "the model tokenizer")

    async def GetModelInfo(
        self, request: pb2.GetModelInfoRequest, context: grpc.aio.ServicerContext
    ) -> pb2.GetModelInfoResponse:
        raise _missing("InferenceService.GetModelInfo", "model loading")

    async def WatchLoad(
        self, request: pb2.WatchLoadRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb2.WatchLoadResponse]:
        raise _missing("InferenceService.WatchLoad", "load reporting")
        yield  # pragma: no cover
