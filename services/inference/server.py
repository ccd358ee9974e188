"""Builds the inference service's gRPC server."""

from __future__ import annotations

from collections.abc import Sequence

import grpc

from autoglm.inference.v1 import inference_service_pb2, inference_service_pb2_grpc
from services.common.grpc_server import RunningServer, start_server
from services.inference.config import InferenceConfig
from services.inference.servicer import InferenceServicer


async def build_server(config: InferenceConfig) -> RunningServer:
    def register(server: grpc.aio.Server) -> Sequence[str]:
        inference_service_pb2_grpc.add_InferenceServiceServicer_to_server(InferenceServicer(), server)
        return [inference_service_pb2.DESCRIPTOR.services_by_name["InferenceService"].full_name]

    return await start_server("inference", register, host=config.server.host, port=config.server.port)
