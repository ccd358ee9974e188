"""The prefix cache against the real model: a request gives the same tokens with and without a hit
(greedy and seeded, from a slot of another width), a conversation's next turn and a shared system
prompt prefill only what is new, tenants never share blocks, and the switch turns it off; the figures
come from WatchLoad."""

from __future__ import annotations

import asyncio

import pytest

from autoglm.common.v1 import generation_pb2
from autoglm.inference.v1 import inference_service_pb2 as pb2
from autoglm.inference.v1 import inference_service_pb2_grpc as pb2_grpc
from tests.integration.inference.helpers import generate, request

TOPICS = ["rivers", "glaciers", "volcanoes", "deserts", "forests", "islands", "canyons", "reefs"]
SAMPLINGS = [{}, {"temperature": 0.8, "top_p": 0.9, "seed": 4321}]


def text_of(model, tokens: int, salt: str = "") -> str:
    """A varied prompt of exactly `tokens` tokens."""
    words = " ".join(f"Note {i} {salt}: the {TOPICS[i % 8]} of region {i * 7 % 31} changed over {i + 3} years."
                     for i in range(tokens // 8 + 8))
    return model.decode(model.encode(words)[:tokens])


async def report(stub: pb2_grpc.InferenceServiceStub) -> pb2.WatchLoadResponse:
    call = stub.WatchLoad(pb2.WatchLoadRequest(interval_ms=50))
    first = await asyncio.wait_for(call.read(), 30)
    call.cancel()
    return first


def tenant(req: pb2.GenerateRequest, tenant_id: str) -> pb2.GenerateRequest:
    req.tenant_id = tenant_id
    return req


@pytest.mark.parametrize("sampling", SAMPLINGS, ids=["greedy", "seeded"])
async def test_same_tokens_with_and_without_a_prefix_hit(inference, model, sampling) -> None:
    cached, plain = await inference(), await inference(prefix_cache=False)
    shared = text_of(model, 300)
    long_one = shared + text_of(model, 400, "long")  # goes to a wider slot class than the others
    prompts = [shared + " Summarise the notes.", shared + " Which region changed most?"]
    cold = [await generate(plain, request(p, max_tokens=24, **sampling)) for p in prompts]

    await generate(cached, request(long_one, max_tokens=4))
    before = await report(cached)
    warm = [await generate(cached, request(p, max_tokens=24, **sampling)) for p in prompts]
    after = await report(cached)

    assert [r.token_ids for r in warm] == [r.token_ids for r in cold]
    assert [r.text for r in warm] == [r.text for r in cold]
    prompt_tokens = sum(r.last.usage.prompt_tokens for r in warm)
    computed = after.prefill_tokens_total - before.prefill_tokens_total
    assert after.prefix_cache_hits - before.prefix_cache_hits >= 2 * (280 // 8)
    assert computed <= prompt_tokens - 2 * 280, f"{computed} of {prompt_tokens} prompt tokens prefilled"
    assert after.prefix_cache_blocks > 0 and after.prefix_cache_bytes == after.prefix_cache_blocks * 8 * (
        model.spec.bytes_per_token)
    off = await report(plain)
    assert (off.prefix_cache_hits, off.prefix_cache_blocks, off.prefix_cache_bytes) == (0, 0, 0)
    assert off.prefill_tokens_total == sum(r.last.usage.prompt_tokens for r in cold)


async def test_the_next_turn_of_a_conversation_prefills_only_what_is_new(inference, model) -> None:
    stub, plain = await inference(), await inference(prefix_cache=False)
    user = generation_pb2.CHAT_ROLE_USER
    history: list[generation_pb2.ChatMessage] = []
    for turn in range(3):
        history.append(generation_pb2.ChatMessage(role=user, content=text_of(model, 40, f"turn {turn}")))
        req = pb2.GenerateRequest(messages=history, sampling=generation_pb2.SamplingParams(max_tokens=32))
        before = await report(stub)
        answer = await generate(stub, req)
        after = await report(stub)
        assert answer.token_ids == (await generate(plain, req)).token_ids
        computed = after.prefill_tokens_total - before.prefill_tokens_total
        if turn:  # the earlier turns come from the cache: the new ~40 tokens, the answer and a block's tail
            assert computed <= 40 + 32 + 30, f"turn {turn}: {computed} of {answer.last.usage.prompt_tokens}"
        history.append(generation_pb2.ChatMessage(role=generation_pb2.CHAT_ROLE_ASSISTANT, content=answer.text))


async def test_16_concurrent_requests_sharing_a_system_prompt_prefill_it_once(inference, model) -> None:
    stub = await inference(max_batch_size=16)
    system = generation_pb2.ChatMessage(role=generation_pb2.CHAT_ROLE_SYSTEM, content=text_of(model, 500, "system"))

    def ask(i: int) -> pb2.GenerateRequest:
        question = generation_pb2.ChatMessage(role=generation_pb2.CHAT_ROLE_USER, content=f"Q{i}?")
        return pb2.GenerateRequest(messages=[system, question], sampling=generation_pb2.SamplingParams(max_tokens=4))

    before = await report(stub)
    results = await asyncio.gather(*(generate(stub, ask(i)) for i in range(16)))
    after = await report(stub)
    one = results[0].last.usage.prompt_tokens
    computed = after.prefill_tokens_total - before.prefill_tokens_total
    # one request computes the system prompt; each other one only its question and a block's tail
    assert computed <= one + 15 * 20, f"{computed} prompt tokens prefilled for 16 x {one}"
    assert after.prefix_cache_hits - before.prefix_cache_hits >= 15 * (500 // 8 - 1)


async def test_tenants_never_share_prefix_blocks(inference, model) -> None:
    stub = await inference()
    prompt = text_of(model, 200, "tenant")
    await generate(stub, tenant(request(prompt, max_tokens=2), "acme"))
    first = await report(stub)
    await generate(stub, tenant(request(prompt, max_tokens=2), "globex"))
    other = await report(stub)
    assert other.prefix_cache_hits == first.prefix_cache_hits
    assert other.prefill_tokens_total - first.prefill_tokens_total == 200
    await generate(stub, tenant(request(prompt, max_tokens=2), "acme"))
    same = await report(stub)
    assert same.prefix_cache_hits - other.prefix_cache_hits == 198 // 8
    assert same.prefill_tokens_total - other.prefill_tokens_total == 200 - 198 // 8 * 8
