"""Generate, CountTokens and GetModelInfo over real gRPC against the real INT8 model."""

from __future__ import annotations

import grpc
import pytest

from autoglm.common.v1 import generation_pb2
from autoglm.inference.v1 import inference_service_pb2 as pb2
from tests.integration.inference.helpers import generate, request

USER = generation_pb2.CHAT_ROLE_USER


async def test_greedy_prompt_streams_coherent_text_with_exact_usage(inference, model) -> None:
    stub = await inference()
    result = await generate(stub, request("The capital of France is", max_tokens=8))
    assert "Paris" in result.text
    last = result.last
    assert last.finish_reason == generation_pb2.FINISH_REASON_LENGTH
    prompt_tokens = len(model.encode("The capital of France is"))
    assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (prompt_tokens, 8)
    assert last.usage.total_tokens == prompt_tokens + 8
    assert len(result.token_ids) == 8
    assert result.text == model.decode(result.token_ids)
    assert all(not m.HasField("usage") for m in result.messages[:-1])


async def test_chat_messages_use_the_models_template_and_count_the_same(inference, model) -> None:
    stub = await inference()
    messages = [generation_pb2.ChatMessage(role=USER, content="Say hello.")]
    counted = await stub.CountTokens(pb2.CountTokensRequest(messages=messages), timeout=10)
    rendered = model.template.render(())  # system prompt only: the template adds it
    assert counted.token_count > len(model.encode("Say hello.")) + len(model.encode(rendered))
    assert counted.context_window == model.manifest.context_window
    reply = await generate(stub, pb2.GenerateRequest(messages=messages,
                                                     sampling=generation_pb2.SamplingParams(max_tokens=6)))
    assert reply.last.usage.prompt_tokens == counted.token_count
    assert reply.text.strip()


async def test_model_info_describes_the_loaded_int8_model(inference, model) -> None:
    stub = await inference(max_batch_size=12)
    info = await stub.GetModelInfo(pb2.GetModelInfoRequest(), timeout=10)
    assert info.name == model.manifest.name and info.version == model.manifest.version
    assert info.precision == pb2.PRECISION_INT8
    assert info.execution_provider == "CPUExecutionProvider"
    assert info.context_window == model.manifest.context_window and info.vocab_size == model.manifest.vocab_size
    assert info.max_batch_size == 12 and info.replica_id == "inference-test"
    assert len(info.manifest_sha256) == 64


@pytest.mark.parametrize(
    ("req", "words"),
    [
        (pb2.GenerateRequest(), ["exactly one of prompt and messages", "neither"]),
        (pb2.GenerateRequest(prompt="x", messages=[generation_pb2.ChatMessage(role=USER, content="y")]),
         ["exactly one of prompt and messages", "both"]),
        (pb2.GenerateRequest(prompt="x", sampling=generation_pb2.SamplingParams(temperature=3.0)),
         ["temperature", "(0, 2]", "3"]),
        (pb2.GenerateRequest(prompt="x", sampling=generation_pb2.SamplingParams(top_p=0.0)), ["top_p", "(0, 1]"]),
        (pb2.GenerateRequest(prompt="x", sampling=generation_pb2.SamplingParams(repetition_penalty=0.5)),
         ["repetition_penalty", "[1, 2]"]),
        (pb2.GenerateRequest(prompt="x", sampling=generation_pb2.SamplingParams(max_tokens=0)), ["max_tokens", ">= 1"]),
    ],
)
async def test_invalid_requests_answer_invalid_argument_naming_the_field(inference, req, words) -> None:
    stub = await inference()
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await generate(stub, req, timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    for word in words:
        assert word in err.value.details()


async def test_prompt_plus_max_tokens_over_the_context_window_names_both_numbers(inference, model) -> None:
    stub = await inference()
    window = model.manifest.context_window
    prompt = "hello world"
    prompt_tokens = len(model.encode(prompt))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await generate(stub, request(prompt, max_tokens=window), timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"prompt ({prompt_tokens} tokens)" in err.value.details()
    assert f"max_tokens ({window})" in err.value.details()
    assert str(window) in err.value.details()


async def test_stop_sequence_ends_the_stream_before_it(inference) -> None:
    stub = await inference()
    free = await generate(stub, request("def fib(n):", max_tokens=16))
    assert "return" in free.text
    stopped = await generate(stub, request("def fib(n):", max_tokens=16, stop=["return"]))
    assert stopped.text == free.text[: free.text.index("return")]
    assert stopped.last.finish_reason == generation_pb2.FINISH_REASON_STOP
    assert stopped.last.usage.completion_tokens < 16


async def test_same_seed_same_text_and_other_seed_differs(inference) -> None:
    stub = await inference()
    req = request("Once upon a time", max_tokens=12, temperature=1.0, top_p=0.95, top_k=50, seed=7)
    first, second = await generate(stub, req), await generate(stub, req)
    assert first.token_ids == second.token_ids
    others = [await generate(stub, request("Once upon a time", max_tokens=12, temperature=1.0, seed=s))
              for s in (8, 9)]
    assert any(o.token_ids != first.token_ids for o in others)


async def test_coalescing_sends_fewer_messages_with_the_same_text(inference) -> None:
    stub = await inference()
    plain = await generate(stub, request("The capital of France is", max_tokens=12))
    grouped = await generate(stub, request("The capital of France is", max_tokens=12,
                                           stream_options=generation_pb2.StreamOptions(coalesce_tokens=4)))
    assert grouped.text == plain.text and grouped.token_ids == plain.token_ids
    assert len(grouped.messages) <= 3 < len(plain.messages)
    assert all(len(m.token_ids) <= 4 for m in grouped.messages)
