"""gRPC servicer of the inference service: thin conversions around the engine."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc

from autoglm.inference.v1 import inference_service_pb2 as pb2
from autoglm.inference.v1 import inference_service_pb2_grpc as pb2_grpc
from services.common.errors import InvalidInput
from services.inference import convert
from services.inference.engine.engine import Engine

MIN_WATCH_INTERVAL_MS = 50
DEFAULT_WATCH_INTERVAL_MS = 1000


class InferenceServicer(pb2_grpc.InferenceServiceServicer):
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    async def Generate(
        self, request: pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb2.GenerateResponse]:
        async for delta in self.engine.generate(convert.generation_request(request)):
            yield convert.generate_response(delta)

    async def CountTokens(
        self, request: pb2.CountTokensRequest, context: grpc.aio.ServicerContext
    ) -> pb2.CountTokensResponse:
        count = await self.engine.count_tokens(request.prompt, convert.messages(request.messages))
        return pb2.CountTokensResponse(token_count=count, context_window=self.engine.model_info().context_window)

    async def GetModelInfo(
        self, request: pb2.GetModelInfoRequest, context: grpc.aio.ServicerContext
    ) -> pb2.GetModelInfoResponse:
        return convert.model_info(self.engine.model_info())

    async def WatchLoad(
        self, request: pb2.WatchLoadRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb2.WatchLoadResponse]:
        interval = request.interval_ms or DEFAULT_WATCH_INTERVAL_MS
        if interval < MIN_WATCH_INTERVAL_MS:
            raise InvalidInput(f"interval_ms must be >= {MIN_WATCH_INTERVAL_MS}, got {interval}", field="interval_ms")
        while True:
            yield convert.load_report(self.engine.load_report())
            await asyncio.sleep(interval / 1000)
