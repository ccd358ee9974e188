"""The chat figures of `make bench-inference` (`--only chat` measures just these, into
bench/results/inference-chat.json): time to first token of each turn of a 10-turn conversation (user
turns of ~40 tokens, answers of at most 64, greedy) through the gRPC service with and without its
prefix cache, and the prompt tokens it computes for 16 concurrent requests sharing a 500-token
system prompt (read from WatchLoad's prefill_tokens_total). Both services run side by side and take
turns conversation by conversation (REPEATS conversations each, the same ones for both: the answers
are the same tokens either way), so load from other work spreads evenly; each turn's figure is the
median over the conversations.
"""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import time
from typing import Any

import grpc

from autoglm.common.v1 import generation_pb2
from autoglm.inference.v1 import inference_service_pb2 as pb2
from autoglm.inference.v1 import inference_service_pb2_grpc as pb2_grpc
from services.inference.engine.model import LoadedModel

TURNS, USER_TOKENS, ANSWER_TOKENS, REPEATS = 10, 40, 64, 3
SYSTEM_TOKENS, SHARED_STREAMS = 500, 16
TURN10_OVER_TURN1, SHARED_PREFILL_FACTOR = 1.5, 1.2
TOPICS = ["rivers", "glaciers", "volcanoes", "deserts", "forests", "islands", "canyons", "reefs"]
USER, SYSTEM, ASSISTANT = (generation_pb2.CHAT_ROLE_USER, generation_pb2.CHAT_ROLE_SYSTEM,
                           generation_pb2.CHAT_ROLE_ASSISTANT)


def text_of(model: LoadedModel, tokens: int, salt: str) -> str:
    words = " ".join(f"Tell me {salt}, note {i}: how did the {TOPICS[i % 8]} of region {i * 7 % 31} change?"
                     for i in range(tokens // 8 + 8))
    return model.decode(model.encode(words)[:tokens])


async def _report(stub: pb2_grpc.InferenceServiceStub) -> pb2.WatchLoadResponse:
    call = stub.WatchLoad(pb2.WatchLoadRequest(interval_ms=50))
    first = await asyncio.wait_for(call.read(), 30)
    call.cancel()
    return first  # type: ignore[no-any-return]


async def _ask(stub: pb2_grpc.InferenceServiceStub, messages: list[generation_pb2.ChatMessage],
               max_tokens: int) -> tuple[float, str, int]:
    """(seconds to the first token, the answer, prompt tokens)."""
    req = pb2.GenerateRequest(messages=messages, sampling=generation_pb2.SamplingParams(max_tokens=max_tokens),
                              tenant_id="bench")
    start, first, parts, prompt = time.perf_counter(), 0.0, [], 0
    async for message in stub.Generate(req, timeout=600):
        first = first or time.perf_counter() - start
        parts.append(message.delta)
        prompt = message.usage.prompt_tokens or prompt
    return first, "".join(parts), prompt


async def conversation(stub: pb2_grpc.InferenceServiceStub, model: LoadedModel, salt: int) -> dict[str, Any]:
    """TTFT (ms) and prompt tokens of each turn; the prompt tokens the service computed in all."""
    before = await _report(stub)
    history: list[generation_pb2.ChatMessage] = []
    ttft, prompts = [], []
    for turn in range(TURNS):
        history.append(generation_pb2.ChatMessage(role=USER, content=text_of(model, USER_TOKENS, f"{salt}.{turn}")))
        first, answer, prompt = await _ask(stub, history, ANSWER_TOKENS)
        history.append(generation_pb2.ChatMessage(role=ASSISTANT, content=answer))
        ttft.append(first * 1000)
        prompts.append(prompt)
    after = await _report(stub)
    return {"ttft_ms": ttft, "prompt_tokens": prompts,
            "prefill_tokens": after.prefill_tokens_total - before.prefill_tokens_total,
            "prefix_cache_hits": after.prefix_cache_hits - before.prefix_cache_hits}


async def shared_system_prompt(stub: pb2_grpc.InferenceServiceStub, model: LoadedModel) -> dict[str, Any]:
    """Prompt tokens computed for SHARED_STREAMS concurrent requests with one system prompt."""
    system = generation_pb2.ChatMessage(role=SYSTEM, content=text_of(model, SYSTEM_TOKENS, "system"))
    before = await _report(stub)
    results = await asyncio.gather(*(
        _ask(stub, [system, generation_pb2.ChatMessage(role=USER, content=f"Q{i}?")], 4)
        for i in range(SHARED_STREAMS)))
    after = await _report(stub)
    return {"one_prompt_tokens": results[0][2], "all_prompt_tokens": sum(r[2] for r in results),
            "prefill_tokens": after.prefill_tokens_total - before.prefill_tokens_total,
            "prefix_cache_hits": after.prefix_cache_hits - before.prefix_cache_hits}


async def chat_bench(model: LoadedModel, service_factory: Any, settings: dict[str, Any]) -> dict[str, Any]:
    """Both measurements on a service with the prefix cache and on one without, taking turns."""
    variants = {"cache": {}, "no_cache": {"prefix_cache": False}}
    talks: dict[str, list[dict[str, Any]]] = {name: [] for name in variants}
    out: dict[str, Any] = {}
    async with contextlib.AsyncExitStack() as stack:
        stubs = {}
        for name, extra in variants.items():
            service = service_factory({**settings, **extra})
            stack.callback(service.stop)
            channel = await stack.enter_async_context(grpc.aio.insecure_channel(service.address))
            stubs[name] = pb2_grpc.InferenceServiceStub(channel)
            await _ask(stubs[name], [generation_pb2.ChatMessage(role=USER, content="Hello")], 4)  # warm-up
        for salt in range(REPEATS):
            for name, stub in stubs.items():
                talks[name].append(await conversation(stub, model, salt))
        for name, stub in stubs.items():
            runs = talks[name]
            out[name] = {"conversation": {
                "ttft_ms": [statistics.median(run["ttft_ms"][t] for run in runs) for t in range(TURNS)],
                "ttft_ms_runs": [run["ttft_ms"] for run in runs], "prompt_tokens": runs[0]["prompt_tokens"],
                "prefill_tokens": runs[0]["prefill_tokens"], "prefix_cache_hits": runs[0]["prefix_cache_hits"]},
                "shared_system_prompt": await shared_system_prompt(stub, model)}
    return out


def chat_entries(out: dict[str, Any]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(results entries, targets) in bench_inference's conventions."""
    results: dict[str, Any] = {}
    for name in ("cache", "no_cache"):
        talk, shared = out[name]["conversation"], out[name]["shared_system_prompt"]
        results[f"chat_ttft_by_turn_{name}"] = {
            "value": talk["ttft_ms"], "unit": f"ms per turn (1..10), median of {REPEATS} conversations",
            "runs": talk["ttft_ms_runs"], "prompt_tokens": talk["prompt_tokens"],
            "prefill_tokens_first_conversation": talk["prefill_tokens"],
            "prefix_cache_hits_first_conversation": talk["prefix_cache_hits"],
            "turns": f"{TURNS} turns, user turns of {USER_TOKENS} tokens, answers of at most {ANSWER_TOKENS}"}
        results[f"shared_system_prompt_prefill_{name}"] = {
            "value": shared["prefill_tokens"], "unit": "prompt tokens computed", **shared,
            "requests": f"{SHARED_STREAMS} concurrent, one {SYSTEM_TOKENS}-token system prompt + a short question"}
    cached = out["cache"]
    talk, shared = cached["conversation"], cached["shared_system_prompt"]
    targets = [
        {"name": "chat turn-10 TTFT / turn-1 TTFT, prefix cache on",
         "measured": talk["ttft_ms"][-1] / talk["ttft_ms"][0], "target": TURN10_OVER_TURN1, "better": "lower",
         "anchor": f"the same conversation's first turn; without the cache the ratio was "
                   f"{out['no_cache']['conversation']['ttft_ms'][-1] / out['no_cache']['conversation']['ttft_ms'][0]:.2f}"},
        {"name": f"prefill tokens computed, {SHARED_STREAMS} requests sharing a {SYSTEM_TOKENS}-token system prompt "
                 "/ one prompt's tokens",
         "measured": shared["prefill_tokens"] / shared["one_prompt_tokens"], "target": SHARED_PREFILL_FACTOR,
         "better": "lower", "anchor": f"one request's {shared['one_prompt_tokens']} prompt tokens"},
    ]
    return results, targets
