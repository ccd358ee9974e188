"""Builds the inference service's gRPC server around a loaded model and a running engine."""

from __future__ import annotations

from collections.abc import Sequence

import grpc

from autoglm.inference.v1 import inference_service_pb2, inference_service_pb2_grpc
from services.common.grpc_server import RunningServer, start_server
from services.inference.billing_client import GrpcEngineUsage
from services.inference.config import InferenceConfig
from services.inference.engine.engine import Engine
from services.inference.engine.model import LoadedModel, load_model
from services.inference.servicer import InferenceServicer
from services.inference.usage_reporter import UsageReporter


async def build_server(config: InferenceConfig, model: LoadedModel | None = None) -> RunningServer:
    """Serve `model` (loaded from `config.model_dir` when not given); the engine stops with the server."""
    model = model if model is not None else load_model(config.model_dir, config.session, config.verify_model, config.precision)
    engine = Engine(model, config.scheduler, config.replica_id)
    reporter = None
    if config.billing:
        reporter = UsageReporter(GrpcEngineUsage(config.billing), config.replica_id, config.usage_buffer,
                                 config.usage_batch, config.usage_flush_s)
        engine.on_finished = reporter.add
        reporter.start()
    await engine.start()

    def register(server: grpc.aio.Server) -> Sequence[str]:
        inference_service_pb2_grpc.add_InferenceServiceServicer_to_server(InferenceServicer(engine), server)
        return [inference_service_pb2.DESCRIPTOR.services_by_name["InferenceService"].full_name]

    try:
        running = await start_server("inference", register, host=config.server.host, port=config.server.port)
    except BaseException:
        await engine.stop()
        if reporter is not None:
            await reporter.stop(0)
        raise
    running.on_stop.append(engine.stop)
    if reporter is not None:
        running.on_stop.append(reporter.stop)  # after the engine: its last sequences are sent too
    return running
