"""Continuous batching against the real model: batch invariance, cancellation and deadlines freeing
the KV-cache (read from WatchLoad), the bounded priority queue, 64 concurrent streams."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import grpc
import pytest

from autoglm.common.v1 import generation_pb2
from autoglm.inference.v1 import inference_service_pb2 as pb2
from autoglm.inference.v1 import inference_service_pb2_grpc as pb2_grpc
from tests.integration.inference.helpers import generate, request

# A prompt the model continues for a long time (no early end-of-sequence).
LONG = "Once upon a time, there was a dragon who"
PROMPTS = [
    "The capital of France is", "Once upon a time, in a small village,", "def fib(n):", "Water boils at",
    "The three primary colors are", "In 1969, astronauts", "A good breakfast includes", "import numpy as np\n",
    "The quick brown fox", "My favourite season is", "To make tea, first", "The largest planet is",
    "Dear Sir or Madam,", "SELECT name FROM", "The meaning of life is", "Photosynthesis is the process",
]


async def wait_for_report(stub: pb2_grpc.InferenceServiceStub, ready: Callable[[pb2.WatchLoadResponse], bool],
                          timeout: float = 60) -> pb2.WatchLoadResponse:
    """Follow WatchLoad (every 50 ms) until a report satisfies `ready`."""
    async def follow() -> pb2.WatchLoadResponse:
        async for report in stub.WatchLoad(pb2.WatchLoadRequest(interval_ms=50)):
            if ready(report):
                return report
        raise AssertionError("WatchLoad ended")

    return await asyncio.wait_for(follow(), timeout)


@pytest.mark.parametrize("sampling", [{}, {"temperature": 0.8, "top_p": 0.9, "seed": 1234}],
                         ids=["greedy", "seeded"])
async def test_same_tokens_alone_and_inside_a_batch_of_16(inference, sampling) -> None:
    stub = await inference(max_batch_size=17)
    target = request("Explain why the sky is blue.", max_tokens=16, **sampling)
    alone = await generate(stub, target)
    others = [request(p, max_tokens=8 + i % 8) for i, p in enumerate(PROMPTS)]
    results = await asyncio.gather(*(generate(stub, r) for r in [*others[:8], target, *others[8:]]))
    assert results[8].token_ids == alone.token_ids
    assert results[8].text == alone.text


async def test_cancelled_stream_leaves_the_batch_and_frees_its_kv_cache(inference) -> None:
    stub = await inference()
    call = stub.Generate(request(LONG, max_tokens=4000))
    await call.read()
    busy = await wait_for_report(stub, lambda r: r.active_sequences == 1 and r.kv_cache_bytes > 0)
    assert busy.kv_cache_tokens > 0 and busy.cancelled_total == 0
    call.cancel()
    freed = await wait_for_report(stub, lambda r: r.cancelled_total == 1)
    assert (freed.active_sequences, freed.kv_cache_tokens, freed.kv_cache_bytes) == (0, 0, 0)


async def test_expired_deadline_ends_the_sequence_and_frees_its_kv_cache(inference) -> None:
    stub = await inference()
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await generate(stub, request(LONG, max_tokens=4000), timeout=0.5)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    freed = await wait_for_report(stub, lambda r: r.cancelled_total == 1)
    assert (freed.active_sequences, freed.kv_cache_bytes) == (0, 0)


async def test_full_queue_answers_resource_exhausted_and_core_goes_first(inference) -> None:
    stub = await inference(max_batch_size=1, queue_capacity=2)
    running = stub.Generate(request(LONG, max_tokens=4000))
    await running.read()
    order: list[str] = []

    async def queued(name: str, traffic: int) -> None:
        await generate(stub, request("Hello", max_tokens=2, traffic_class=traffic))
        order.append(name)

    batch = asyncio.create_task(queued("batch", generation_pb2.TRAFFIC_CLASS_BATCH))
    await wait_for_report(stub, lambda r: r.queue_depth == 1)
    core = asyncio.create_task(queued("core", generation_pb2.TRAFFIC_CLASS_CORE))
    report = await wait_for_report(stub, lambda r: r.queue_depth == 2)
    assert report.queue_capacity == 2
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await generate(stub, request("Hello", max_tokens=2), timeout=10)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "queue is full" in err.value.details()
    running.cancel()
    await asyncio.wait_for(asyncio.gather(batch, core), 60)
    assert order == ["core", "batch"]


async def test_64_concurrent_streams_of_mixed_lengths_complete_with_exact_usage(inference, model) -> None:
    stub = await inference()
    requests = [request(PROMPTS[i % 16] + " " * (i % 3), max_tokens=1 + i % 8) for i in range(64)]
    results = await asyncio.wait_for(asyncio.gather(*(generate(stub, r) for r in requests)), 240)
    for req, result in zip(requests, results, strict=True):
        usage, finish = result.last.usage, result.last.finish_reason
        assert usage.prompt_tokens == len(model.encode(req.prompt))
        assert usage.completion_tokens == len(result.token_ids)
        assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
        if finish == generation_pb2.FINISH_REASON_LENGTH:
            assert usage.completion_tokens == req.sampling.max_tokens
        else:
            assert finish == generation_pb2.FINISH_REASON_STOP and usage.completion_tokens <= req.sampling.max_tokens
    report = await wait_for_report(stub, lambda r: r.active_sequences == 0)
    assert report.kv_cache_bytes == 0 and report.queue_depth == 0
