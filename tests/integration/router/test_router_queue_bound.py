"""The router's wait queue is bounded: beyond it a request is refused at once with RESOURCE_EXHAUSTED
(QUEUE_FULL) and a retry delay, before a budget hold or rate-limit tokens are spent on it."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from autoglm.common.v1 import generation_pb2
from autoglm.router.v1 import router_service_pb2 as pb2
from services.inference.engine.model import LoadedModel
from tests.integration.router.conftest import MODEL, start_mesh
from tests.integration.router.test_router_controls import retry_delay_s
from tests.integration.router.test_router_vertical import bearer


async def test_a_full_wait_queue_refuses_with_queue_full_and_a_retry_delay(
        serve, tmp_path: Path, loaded_model: LoadedModel) -> None:
    mesh = await start_mesh(serve, tmp_path, loaded_model, max_concurrent=1, max_queued=0, queue_retry_after_s=2.0)
    try:
        secret, _ = await mesh.create_key("acme")
        long = pb2.GenerateRequest(model=MODEL, prompt="Tell a long story.", cache_policy=pb2.CACHE_POLICY_BYPASS,
                                   sampling=generation_pb2.SamplingParams(temperature=0.0, max_tokens=200))
        stream = mesh.router_stub.Generate(long, metadata=bearer(secret), timeout=120)
        first = await stream.read()  # the only slot is taken
        assert first.delta_tokens >= 1
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await mesh.router_stub.Complete(pb2.CompleteRequest(model=MODEL, prompt="Hi"), metadata=bearer(secret),
                                            timeout=30)
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "queue is full" in (refused.value.details() or "") and retry_delay_s(refused.value) == 2.0
        stream.cancel()
    finally:
        await mesh.channel.close()
        await mesh.billing_channel.close()
