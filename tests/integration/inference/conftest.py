"""One loaded model per test session (loading takes seconds); a fresh server per test on port 0."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from typing import Any

import pytest

from autoglm.inference.v1 import inference_service_pb2_grpc as pb2_grpc
from services.common.config import ServerSettings
from services.common.grpc_server import RunningServer
from services.inference.config import InferenceConfig
from services.inference.engine.model import LoadedModel, load_model
from services.inference.server import build_server
from tests.conftest import channel

BASE = InferenceConfig(server=ServerSettings(port=0), replica_id="inference-test")


@pytest.fixture(scope="session")
def model() -> LoadedModel:
    try:
        return load_model(None, BASE.session)
    except Exception as err:  # the model is built by `make model`, a prerequisite of `make test`
        pytest.fail(f"no built model: {err}")


@pytest.fixture
async def inference(serve, model) -> AsyncIterator[Callable[..., Awaitable[Any]]]:
    """`await inference(**config_overrides)` -> a stub on a freshly started server."""
    channels = []

    async def start(**overrides: Any) -> pb2_grpc.InferenceServiceStub:
        running: RunningServer = await serve(build_server(replace(BASE, **overrides), model))
        context = channel(running)
        channels.append(context)
        return pb2_grpc.InferenceServiceStub(await context.__aenter__())

    yield start
    for context in channels:
        await context.__aexit__(None, None, None)
