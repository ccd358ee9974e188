"""The chat figures of `make bench-inference` (`--only chat` measures just these, into
bench/results/inference-chat.json): time to first token of each turn of a 10-turn conversation (user
turns of ~40 tokens, answers of at most 64, greedy) through the router (gRPC, the conversation kept by
its `context_id`, so each turn sends only the new user message) in front of an inference replica with
its prefix cache and in front of one without, and the prompt tokens a replica computes for 16
concurrent requests sharing a 500-token system prompt, also through the router (read from the
replica's WatchLoad prefill_tokens_total). The anchor is llama.cpp (llama-cpp-python on the GGUF the
model is built from, the same threads, its prompt cache `LlamaRAMCache` on) holding the same
conversation: the same user turns, each runner's own answers in its history, in its own process
(bench/inference/anchors.py `chat`). Billing and both routers run as their own processes, as the
launcher starts them. The three take turns conversation by conversation (REPEATS conversations each,
the same user turns for all), so load from other work spreads evenly; each turn's figure is the median
over the conversations. Those conversations send each turn as soon as the answer ends (the worst case
for the prefix cache: decode-step KV is not cached, so what of the answer the replica has not prefilled
while decoding it, into a second slot, is computed with the next turn; the first answer is not, as its
turn has no earlier exchange). Each round also holds a paced conversation, other user turns with THINK_S seconds between the
end of an answer and the next turn (a person reading it), through the cached router and in llama.cpp.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc

from autoglm.billing.v1 import billing_service_pb2 as billing_pb2
from autoglm.billing.v1 import billing_service_pb2_grpc as billing_grpc
from autoglm.common.v1 import generation_pb2, money_pb2
from autoglm.inference.v1 import inference_service_pb2 as pb2
from autoglm.inference.v1 import inference_service_pb2_grpc as pb2_grpc
from autoglm.router.v1 import admin_service_pb2 as admin_pb2
from autoglm.router.v1 import admin_service_pb2_grpc as admin_grpc
from autoglm.router.v1 import router_service_pb2 as router_pb2
from autoglm.router.v1 import router_service_pb2_grpc as router_grpc
from bench.inference.anchors import run_isolated_chat
from services.cli.endpoint import billing_token, operator_channel
from services.inference.engine.model import LoadedModel
from tests.integration.router.conftest import ADMIN_TOKEN, MODEL
from tests.integration.router.service_process import drain, start_service, stop

TURNS, USER_TOKENS, ANSWER_TOKENS, REPEATS = 10, 40, 64, 3
THINK_S = 1.0  # the paced conversations' pause between an answer's end and the next turn
SYSTEM_TOKENS, SHARED_STREAMS = 500, 16
TURN10_OVER_TURN1, SHARED_PREFILL_FACTOR, TURN10_OVER_LLAMA = 1.5, 1.2, 0.5
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


class Routed:
    """An inference replica and the router in front of it: the conversation goes through the router,
    the replica's own counters come from its WatchLoad."""

    def __init__(self, router: str, inference: str, api_key: str) -> None:
        self.router_channel = grpc.aio.insecure_channel(router)
        self.inference_channel = grpc.aio.insecure_channel(inference)
        self.router = router_grpc.RouterServiceStub(self.router_channel)
        self.inference = pb2_grpc.InferenceServiceStub(self.inference_channel)
        self.auth = [("authorization", f"Bearer {api_key}")]

    async def close(self) -> None:
        await self.router_channel.close()
        await self.inference_channel.close()


async def _ask(routed: Routed, messages: list[generation_pb2.ChatMessage], max_tokens: int,
               context_id: str = "") -> tuple[float, str, int]:
    """(seconds to the first text, the answer, prompt tokens), through the router."""
    req = router_pb2.GenerateRequest(
        model=MODEL, messages=messages, context_id=context_id, cache_policy=router_pb2.CACHE_POLICY_BYPASS,
        sampling=generation_pb2.SamplingParams(temperature=0.0, max_tokens=max_tokens))
    start, first, parts, prompt = time.perf_counter(), 0.0, [], 0
    async for message in routed.router.Generate(req, metadata=routed.auth, timeout=600):
        if message.delta and not first:
            first = time.perf_counter() - start
        parts.append(message.delta)
        if message.HasField("summary"):
            prompt = message.summary.usage.prompt_tokens
    return first, "".join(parts), prompt


def user_turns(model: LoadedModel, salt: int, turns: int) -> list[str]:
    return [text_of(model, USER_TOKENS, f"{salt}.{turn}") for turn in range(turns)]


async def conversation(routed: Routed, turns: list[str], context_id: str, think_s: float = 0.0) -> dict[str, Any]:
    """TTFT (ms) and prompt tokens of each turn; the prompt tokens the replica computed in all. `think_s`:
    the pause after each answer before the next turn (the paced conversations' reader)."""
    before = await _report(routed.inference)
    ttft, prompts = [], []
    for i, text in enumerate(turns):
        if i and think_s:
            await asyncio.sleep(think_s)  # the modelled reader, not a synchronisation
        first, _answer, prompt = await _ask(
            routed, [generation_pb2.ChatMessage(role=USER, content=text)], ANSWER_TOKENS, context_id)
        ttft.append(first * 1000)
        prompts.append(prompt)
    after = await _report(routed.inference)
    return {"ttft_ms": ttft, "prompt_tokens": prompts,
            "prefill_tokens": after.prefill_tokens_total - before.prefill_tokens_total,
            "prefix_cache_hits": after.prefix_cache_hits - before.prefix_cache_hits}


async def shared_system_prompt(routed: Routed, model: LoadedModel) -> dict[str, Any]:
    """Prompt tokens computed for SHARED_STREAMS concurrent requests with one system prompt."""
    system = generation_pb2.ChatMessage(role=SYSTEM, content=text_of(model, SYSTEM_TOKENS, "system"))
    before = await _report(routed.inference)
    results = await asyncio.gather(*(
        _ask(routed, [system, generation_pb2.ChatMessage(role=USER, content=f"Q{i}?")], 4)
        for i in range(SHARED_STREAMS)))
    after = await _report(routed.inference)
    return {"one_prompt_tokens": results[0][2], "all_prompt_tokens": sum(r[2] for r in results),
            "prefill_tokens": after.prefill_tokens_total - before.prefill_tokens_total,
            "prefix_cache_hits": after.prefix_cache_hits - before.prefix_cache_hits}


async def _start_routers(addresses: dict[str, str], tmp: Path,
                         processes: list[subprocess.Popen[bytes]]) -> dict[str, Routed]:
    """Billing and one router per replica, each its own process (as `autoglm up` starts them)."""
    billing_proc, billing = start_service("billing", ["--data-dir", str(tmp / "billing")], processes)
    drain(billing_proc)
    async with operator_channel(billing, billing_token(tmp / "billing")) as operator:
        await billing_grpc.BillingServiceStub(operator).CreatePrice(billing_pb2.CreatePriceRequest(
            price=billing_pb2.Price(model=MODEL, input_per_million=money_pb2.Money(currency_code="USD", micros=1),
                                    output_per_million=money_pb2.Money(currency_code="USD", micros=1)),
            actor="bench"), timeout=30)
    routed = {}
    for name, inference in addresses.items():
        config = tmp / f"router-{name}.yaml"
        config.write_text(json.dumps({"router": {"admin_token": ADMIN_TOKEN, "data_dir": str(tmp / f"router-{name}")}}))
        proc, router = start_service("router", ["--config", str(config), "--inference", inference, "--billing",
                                                billing], processes)
        drain(proc)
        async with grpc.aio.insecure_channel(router) as channel:
            key = await admin_grpc.AdminServiceStub(channel).CreateApiKey(
                admin_pb2.CreateApiKeyRequest(tenant_id="bench", name="chat-bench"),
                metadata=[("authorization", f"Bearer {ADMIN_TOKEN}")], timeout=30)
        routed[name] = Routed(router, inference, key.secret)
    return routed


async def chat_bench(model: LoadedModel, service_factory: Any, settings: dict[str, Any], turns: int = TURNS,
                     repeats: int = REPEATS) -> dict[str, Any]:
    """Both services, each behind its router, and llama.cpp with its prompt cache, taking turns."""
    variants = {"cache": {}, "no_cache": {"prefix_cache": False}}
    talks: dict[str, list[dict[str, Any]]] = {name: [] for name in (*variants, "llama_cpp", "cache_paced",
                                                                    "llama_cpp_paced")}
    gguf, threads = Path(model.manifest.source.path), int(settings["intra_op_threads"])
    out: dict[str, Any] = {"turns": turns, "repeats": repeats, "threads": threads}
    processes: list[subprocess.Popen[bytes]] = []
    async with contextlib.AsyncExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-chat-")))
        stack.callback(stop, processes)
        addresses = {}
        for name, extra in variants.items():
            service = service_factory({**settings, **extra})
            stack.callback(service.stop)
            addresses[name] = service.address
        routed = await _start_routers(addresses, tmp, processes)
        for front in routed.values():
            stack.push_async_callback(front.close)
            await _ask(front, [generation_pb2.ChatMessage(role=USER, content="Hello")], 4)  # warm-up
        for salt in range(repeats):
            said = user_turns(model, salt, turns)
            for name, front in routed.items():
                talks[name].append(await conversation(front, said, f"bench-{name}-{salt}"))
            talks["llama_cpp"].append(run_isolated_chat(gguf, said, ANSWER_TOKENS, threads))
            paced = user_turns(model, 1000 + salt, turns)  # other turns: no hit on the conversations above
            talks["cache_paced"].append(await conversation(routed["cache"], paced, f"bench-paced-{salt}", THINK_S))
            talks["llama_cpp_paced"].append(run_isolated_chat(gguf, paced, ANSWER_TOKENS, threads))
        for name, front in routed.items():
            out[name] = {"conversation": _summary(talks[name], turns),
                         "shared_system_prompt": await shared_system_prompt(front, model)}
    out["cache_paced"] = {"conversation": _summary(talks["cache_paced"], turns), "think_s": THINK_S}
    for name in ("llama_cpp", "llama_cpp_paced"):
        llama = talks[name]
        errors = [run["error"] for run in llama if "error" in run]
        out[name] = {"error": errors[0]} if errors else {
            "conversation": _summary(llama, turns), **{k: v for k, v in llama[0].items() if not isinstance(v, list)}}
    return out


def _summary(runs: list[dict[str, Any]], turns: int) -> dict[str, Any]:
    return {"ttft_ms": [statistics.median(run["ttft_ms"][t] for run in runs) for t in range(turns)],
            "ttft_ms_runs": [run["ttft_ms"] for run in runs], "prompt_tokens": runs[0]["prompt_tokens"],
            "prefill_tokens": runs[0].get("prefill_tokens"), "prefix_cache_hits": runs[0].get("prefix_cache_hits")}


def chat_entries(out: dict[str, Any]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(results entries, targets) in bench_inference's conventions."""
    results: dict[str, Any] = {}
    turns, repeats = out["turns"], out["repeats"]
    for name in ("cache", "no_cache"):
        talk, shared = out[name]["conversation"], out[name]["shared_system_prompt"]
        results[f"chat_ttft_by_turn_{name}"] = {
            "value": talk["ttft_ms"], "unit": f"ms per turn (1..{turns}), median of {repeats} conversations",
            "path": "through the router (gRPC Generate, context_id: each turn sends only the new user message)",
            "runs": talk["ttft_ms_runs"], "prompt_tokens": talk["prompt_tokens"],
            "prefill_tokens_first_conversation": talk["prefill_tokens"],
            "prefix_cache_hits_first_conversation": talk["prefix_cache_hits"],
            "turns": f"{turns} turns, user turns of {USER_TOKENS} tokens, answers of at most {ANSWER_TOKENS}"}
        results[f"shared_system_prompt_prefill_{name}"] = {
            "value": shared["prefill_tokens"], "unit": "prompt tokens computed", **shared,
            "computed_per_request_beyond_the_first": (shared["prefill_tokens"] - shared["one_prompt_tokens"])
            / (SHARED_STREAMS - 1),
            "requests": f"{SHARED_STREAMS} concurrent through the router, one {SYSTEM_TOKENS}-token system prompt + "
                        "a short question"}
    llama = out["llama_cpp"]
    results["chat_ttft_by_turn_llama_cpp"] = llama if "error" in llama else {
        "value": llama["conversation"]["ttft_ms"], "unit": f"ms per turn (1..{turns}), median of {repeats} conversations",
        "runs": llama["conversation"]["ttft_ms_runs"], "context_tokens_after_turn": llama["conversation"]["prompt_tokens"],
        **{k: v for k, v in llama.items() if k != "conversation"}}
    paced, llama_paced = out.get("cache_paced"), out.get("llama_cpp_paced", {"error": "not run"})
    if paced is not None:
        results["chat_ttft_by_turn_cache_paced"] = {
            "value": paced["conversation"]["ttft_ms"], "unit": f"ms per turn (1..{turns}), median of {repeats} conversations",
            "runs": paced["conversation"]["ttft_ms_runs"], "prompt_tokens": paced["conversation"]["prompt_tokens"],
            "prefill_tokens_first_conversation": paced["conversation"]["prefill_tokens"],
            "think_s": paced["think_s"], "turns": f"other user turns of {USER_TOKENS} tokens, {paced['think_s']} s "
                                                  "after each answer's end"}
        results["chat_ttft_by_turn_llama_cpp_paced"] = llama_paced if "error" in llama_paced else {
            "value": llama_paced["conversation"]["ttft_ms"], "unit": f"ms per turn (1..{turns})",
            "runs": llama_paced["conversation"]["ttft_ms_runs"]}
    cached = out["cache"]
    talk, shared = cached["conversation"], cached["shared_system_prompt"]
    targets = [
        {"name": f"chat turn-{turns} TTFT / turn-1 TTFT, prefix cache on, through the router",
         "measured": talk["ttft_ms"][-1] / talk["ttft_ms"][0], "target": TURN10_OVER_TURN1, "better": "lower",
         "anchor": f"the same conversation's first turn; without the cache the ratio was "
                   f"{out['no_cache']['conversation']['ttft_ms'][-1] / out['no_cache']['conversation']['ttft_ms'][0]:.2f}"},
        {"name": f"chat turn-{turns} TTFT, prefix cache on, through the router / llama.cpp's turn-{turns} TTFT with "
                 "its prompt cache",
         "measured": None if "error" in llama else talk["ttft_ms"][-1] / llama["conversation"]["ttft_ms"][-1],
         "target": TURN10_OVER_LLAMA, "better": "lower",
         "anchor": llama.get("error", "llama-cpp-python, LlamaRAMCache, the same GGUF, user turns and threads, "
                                      "interleaved conversation by conversation")},
        {"name": f"prefill tokens computed, {SHARED_STREAMS} requests sharing a {SYSTEM_TOKENS}-token system prompt "
                 "/ one prompt's tokens",
         "measured": shared["prefill_tokens"] / shared["one_prompt_tokens"], "target": SHARED_PREFILL_FACTOR,
         "better": "lower", "anchor": f"one request's {shared['one_prompt_tokens']} prompt tokens"},
    ]
    if paced is not None:
        ttft = paced["conversation"]["ttft_ms"]
        targets += [
            {"name": f"paced chat ({paced['think_s']} s between an answer and the next turn): turn-{turns} TTFT / "
                     "turn-1 TTFT, prefix cache on, through the router",
             "measured": ttft[-1] / ttft[0], "target": TURN10_OVER_TURN1, "better": "lower",
             "anchor": "the same paced conversation's first turn (the back-to-back row above is the worst case)"},
            {"name": f"paced chat: turn-{turns} TTFT, prefix cache on, through the router / llama.cpp's turn-{turns} "
                     "TTFT with its prompt cache, same turns",
             "measured": None if "error" in llama_paced else ttft[-1] / llama_paced["conversation"]["ttft_ms"][-1],
             "target": TURN10_OVER_LLAMA, "better": "lower",
             "anchor": llama_paced.get("error", "llama-cpp-python, LlamaRAMCache, the same paced user turns")}]
    return results, targets
