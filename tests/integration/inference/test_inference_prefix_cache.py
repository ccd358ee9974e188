"""The prefix cache against the real model: a request gives the same tokens with and without a hit
(greedy and seeded, from a slot of another width), a conversation's next turn and a shared system
prompt prefill only what is new, a finished answer is prefilled into the cache (bit for bit a cold
prefill's KV) so the next turn finds its whole history, a long prompt caches no more than the admission
rule allows, tenants never share blocks, and the switch turns it off; the figures come from WatchLoad."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest

from autoglm.common.v1 import generation_pb2
from autoglm.inference.v1 import inference_service_pb2 as pb2
from autoglm.inference.v1 import inference_service_pb2_grpc as pb2_grpc
from services.common.generation import ChatMessage, Role, Sampling
from services.inference.engine.engine import Engine
from services.inference.engine.kv_cache import SlotBatch, width_class
from services.inference.engine.prefix_cache import history_keys, root_key
from services.inference.engine.scheduler import SchedulerSettings
from services.inference.engine.types import GenerationRequest
from tests.integration.inference.helpers import generate, request
from tests.waiting import wait_until

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


@pytest.mark.parametrize("sampling", SAMPLINGS, ids=["greedy", "seeded"])
async def test_a_finished_answer_is_cached_so_the_next_turn_computes_only_its_new_message(
        inference, model, sampling) -> None:
    stub, plain = await inference(), await inference(prefix_cache=False)
    user, assistant = generation_pb2.CHAT_ROLE_USER, generation_pb2.CHAT_ROLE_ASSISTANT
    first = [generation_pb2.ChatMessage(role=user, content=text_of(model, 40, "warm"))]
    answer = await generate(stub, pb2.GenerateRequest(
        messages=first, sampling=generation_pb2.SamplingParams(max_tokens=32, **sampling)))
    history = answer.last.usage.prompt_tokens + answer.last.usage.completion_tokens

    async def cached(blocks: int) -> bool:
        return (await report(stub)).prefix_cache_blocks == blocks

    # once idle, the replica prefills the answer into the cache: every whole block of prompt + answer
    await wait_until(lambda: cached(history // 8), 60, f"{history // 8} blocks cached")
    second = [*first, generation_pb2.ChatMessage(role=assistant, content=answer.text),
              generation_pb2.ChatMessage(role=user, content=text_of(model, 40, "next"))]
    req = pb2.GenerateRequest(messages=second, sampling=generation_pb2.SamplingParams(max_tokens=24, **sampling))
    before = await report(stub)
    warm = await generate(stub, req)
    after = await report(stub)

    assert warm.token_ids == (await generate(plain, req)).token_ids
    assert after.prefix_cache_hits - before.prefix_cache_hits == history // 8  # the whole history, answer too
    computed = after.prefill_tokens_total - before.prefill_tokens_total
    assert computed == warm.last.usage.prompt_tokens - history // 8 * 8  # the new message and a block's tail


@pytest.mark.parametrize("eager", [0, 2], ids=["idle", "while-decoding"])
async def test_answer_blocks_are_a_cold_prefill_of_the_history_bit_for_bit(model, eager) -> None:
    """Whether the answer is prefilled once the replica idles or into a second slot while it is decoded,
    every cached block of prompt + answer is a cold prefill of the whole history's, bit for bit."""
    engine = Engine(model, SchedulerSettings(eager_warm_rows=eager))
    await engine.start()
    try:
        messages = _going_on(model, "bits")
        req = GenerationRequest(messages=messages, sampling=Sampling(max_tokens=40), tenant_id="acme")
        generated = [t async for delta in engine.generate(req) for t in delta.token_ids]
        history = engine.prompt_ids("", messages) + generated
        keys = history_keys(root_key(model.manifest_sha256, "acme"), history, 8)
        assert engine.prefix is not None and len(keys) * 8 > len(history) - len(generated) + 16
        await wait_until(lambda: all(key in engine.prefix for key in keys), 60, "the answer's blocks cached")
        batch = SlotBatch(model.spec, 1, width_class(len(history), model.manifest.context_window))
        slot = batch.take(0)
        mask = np.zeros((1, batch.width), dtype=np.int64)
        mask[0, : len(history)] = 1
        model.runner.prefill(np.array([history], dtype=np.int64), mask, batch.slot_view(slot))
        for i, key in enumerate(keys):
            cached = engine.prefix.get(key)
            assert cached is not None and np.array_equal(cached.data, batch.read_columns(slot, 8 * i, 8 * i + 8)), i
        prompt_blocks = (len(history) - len(generated) - 2) // 8
        # from the prompt's cached blocks on: while decoding (16 tokens or more a call), the rest when idle
        assert engine.load_report().prefix_cache_warm_tokens == (len(keys) - prompt_blocks) * 8
        eager_tokens = engine.load_report().prefix_cache_eager_warm_tokens
        assert eager_tokens >= 16 if eager else eager_tokens == 0
    finally:
        await engine.stop()


async def test_a_long_prompt_caches_no_more_than_its_first_max_prompt_tokens(inference, model) -> None:
    stub = await inference(prefix_cache_max_prompt_tokens=256)
    prompt = text_of(model, 600, "document")
    await generate(stub, request(prompt, max_tokens=2))
    first = await report(stub)
    assert (first.prefix_cache_blocks, first.prefix_cache_bytes) == (32, 32 * 8 * model.spec.bytes_per_token)
    await generate(stub, request(prompt, max_tokens=2))
    again = await report(stub)
    assert again.prefix_cache_hits - first.prefix_cache_hits == 32 and again.prefix_cache_blocks == 32
    assert again.prefill_tokens_total - first.prefill_tokens_total == 600 - 256



class RecordingRunner:
    """The real runner, with the token count of each prefill call; `hold` keeps the next warm-up call
    (the one given a guard) from starting until `release` is set, so a request can arrive during it."""

    def __init__(self, runner) -> None:
        self._runner = runner
        self.calls: list[int] = []
        self.hold = False
        self.entered, self.release = threading.Event(), threading.Event()
        self.guard = None

    def prefill(self, input_ids, attention_mask, view, guard=None):
        self.calls.append(int(input_ids.shape[1]))
        if guard is not None and self.hold:
            self.hold, self.guard = False, guard
            self.entered.set()
            self.release.wait(60)
        return self._runner.prefill(input_ids, attention_mask, view, **({"guard": guard} if guard else {}))

    def __getattr__(self, name: str):
        return getattr(self._runner, name)


async def _answer(engine: Engine, messages: tuple[ChatMessage, ...], max_tokens: int) -> list[int]:
    req = GenerationRequest(messages=messages, sampling=Sampling(max_tokens=max_tokens), tenant_id="acme")
    return [t async for delta in engine.generate(req) for t in delta.token_ids]


def _count_copies(engine: Engine) -> list[int]:
    """The number of cached blocks each copy into a slot moves, appended as the engine copies them."""
    copied: list[int] = []
    copy_in = engine.scheduler._copy_in
    engine.scheduler._copy_in = lambda seq, blocks: (copied.append(len(blocks)), copy_in(seq, blocks))  # type: ignore[method-assign]
    return copied


async def _warmed_first_turn(engine: Engine, model, tokens: int, salt: str
                             ) -> tuple[tuple[ChatMessage, ...], list[int], list[int], list[bytes]]:
    """A first turn of `tokens` user tokens answered (at most 40), once its answer's blocks are cached:
    (its messages, the answer, prompt + answer ids, their block keys)."""
    first = (ChatMessage(Role.USER, text_of(model, tokens, salt)),)
    answer = await _answer(engine, first, 40)
    history = engine.prompt_ids("", first) + answer
    keys = history_keys(root_key(model.manifest_sha256, "acme"), history, 8)
    assert engine.prefix is not None
    prefix = engine.prefix
    await wait_until(lambda: all(key in prefix for key in keys), 60, "the answer's blocks cached")
    return first, answer, history, keys


async def _engines(model, **settings) -> tuple[Engine, Engine, RecordingRunner]:
    engine = Engine(model, SchedulerSettings(**settings))
    plain = Engine(model, SchedulerSettings(prefix_cache=False))
    recorder = RecordingRunner(model.runner)
    engine.scheduler.runner = recorder  # type: ignore[assignment]
    await engine.start()
    await plain.start()
    return engine, plain, recorder


async def test_an_answer_is_warmed_in_one_call_and_the_next_turn_prefills_its_new_tokens_in_one_call(model) -> None:
    """Undisturbed, the idle replica prefills the answer in one call; the next turn's new tokens, though
    they straddle a prefill_chunk boundary, are one model call too, and its tokens are a cold run's."""
    engine, plain, recorder = await _engines(model, eager_warm_rows=0)
    try:
        first, answer, history, keys = await _warmed_first_turn(engine, model, 45, "blocks")
        prompt_tokens = engine.scheduler.counters.prefill_tokens_total
        prompt_calls = next(i for i in range(len(recorder.calls) + 1) if sum(recorder.calls[:i]) == prompt_tokens)
        warm_tokens = engine.load_report().prefix_cache_warm_tokens
        assert warm_tokens >= 16 and recorder.calls[prompt_calls:] == [warm_tokens]

        second = (*first, ChatMessage(Role.ASSISTANT, model.decode(answer)),
                  ChatMessage(Role.USER, text_of(model, 40, "straddle")))
        ids = engine.prompt_ids("", second)
        cached = len(keys) * 8
        assert ids[:cached] == history[:cached] and cached // 128 != (len(ids) - 1) // 128  # straddles 128
        before = len(recorder.calls)
        assert await _answer(engine, second, 16) == await _answer(plain, second, 16)
        assert recorder.calls[before] == len(ids) - cached  # one call, not two either side of 128
    finally:
        await engine.stop()
        await plain.stop()


async def test_a_next_turn_arriving_during_a_warm_up_stops_its_call_and_waits_for_none(model) -> None:
    """The next turn sent while the answer's warm-up call runs stops that call (ONNX Runtime's terminate)
    instead of waiting for it, then prefills the rest of the answer and its new message in one call,
    with a cold run's tokens."""
    engine, plain, recorder = await _engines(model, eager_warm_rows=0)
    try:
        first = (ChatMessage(Role.USER, text_of(model, 45, "stop")),)
        recorder.hold = True
        answer = await _answer(engine, first, 40)
        await wait_until(recorder.entered.is_set, 60, "the answer's warm-up call under way")
        prompt_blocks = (len(engine.prompt_ids("", first)) - 2) // 8
        second = (*first, ChatMessage(Role.ASSISTANT, model.decode(answer)),
                  ChatMessage(Role.USER, text_of(model, 40, "during")))
        ids = engine.prompt_ids("", second)
        before, calls = engine.scheduler.counters.prefill_tokens_total, len(recorder.calls)
        turn = asyncio.ensure_future(_answer(engine, second, 16))
        try:
            await wait_until(lambda: recorder.guard is not None and recorder.guard.stopped, 60,
                             "the warm-up call stopped by the arriving turn")
        finally:
            recorder.release.set()
        tokens = await turn
        counters = engine.scheduler.counters
        assert counters.warm_stopped_total == 1 and counters.warm_tokens_total == 0
        assert counters.prefill_tokens_total - before == len(ids) - 8 * prompt_blocks == recorder.calls[calls] <= 128
        assert tokens == await _answer(plain, second, 16)
    finally:
        await engine.stop()
        await plain.stop()


@pytest.mark.parametrize("sampling", SAMPLINGS, ids=["greedy", "seeded"])
async def test_the_next_turn_takes_over_its_conversations_slot_and_copies_nothing_in(model, sampling) -> None:
    """Once the answer is warmed, the conversation's slot stays parked: the next turn takes it over and
    prefills only its new tokens from there, with no cached block copied into a fresh slot, and its
    tokens are a cold run's (greedy and seeded)."""
    engine, plain, _ = await _engines(model)
    copied = _count_copies(engine)
    try:
        first, answer, history, keys = await _warmed_first_turn(engine, model, 60, "over")
        second = (*first, ChatMessage(Role.ASSISTANT, model.decode(answer)),
                  ChatMessage(Role.USER, text_of(model, 40, "next")))
        ids = engine.prompt_ids("", second)
        shared = next(i for i in range(len(keys), -1, -1) if ids[: 8 * i] == history[: 8 * i])
        counters = engine.scheduler.counters
        before, copied_before = counters.prefill_tokens_total, len(copied)
        req = GenerationRequest(messages=second, sampling=Sampling(max_tokens=16, **sampling), tenant_id="acme")
        tokens = [t async for delta in engine.generate(req) for t in delta.token_ids]
        cold = [t async for delta in plain.generate(req) for t in delta.token_ids]
        assert tokens == cold
        assert engine.load_report().slots_taken_over_total == 1 and counters.tokens_taken_over_total == 8 * shared
        assert copied[copied_before:] == [] and counters.prefill_tokens_total - before == len(ids) - 8 * shared
    finally:
        await engine.stop()
        await plain.stop()


async def test_idle_conversations_hold_at_most_a_quarter_of_the_batch_in_parked_slots(model) -> None:
    """Finished conversations keep their slots for their next turns, but no more of them than
    `max_parked`: the replica's KV tokens stop growing with the number of idle conversations."""
    engine = Engine(model, SchedulerSettings(max_batch_size=8))
    await engine.start()
    try:
        assert engine.scheduler.max_parked == 2
        lengths = []
        for i in range(5):
            first = (ChatMessage(Role.USER, text_of(model, 30, f"idle {i}")),)
            answer = await _answer(engine, first, 24)
            lengths.append(len(engine.prompt_ids("", first)) + len(answer))
            await wait_until(lambda: not engine.scheduler._warming, 60, "the answer warmed")
        await wait_until(lambda: engine.load_report().kv_cache_tokens > 0, 10, "the parked slots reported")
        assert 0 < engine.load_report().kv_cache_tokens <= sum(sorted(lengths)[-2:])
    finally:
        await engine.stop()


async def test_a_turn_that_outgrows_its_batch_still_takes_over_the_slot_moved_while_idle(model) -> None:
    """A conversation whose next turn needs a wider batch class than its parked slot's: the idle replica
    moves the slot to a batch of that class, so the turn still takes it over and copies nothing in, and
    its tokens are a cold run's."""
    engine, plain, _ = await _engines(model)
    copied = _count_copies(engine)
    try:
        first = (ChatMessage(Role.USER, text_of(model, 150, "outgrow")),)
        assert width_class(len(engine.prompt_ids("", first)) + 64, engine.scheduler.max_width) == 256
        answer = await _answer(engine, first, 64)
        await wait_until(lambda: engine.load_report().slots_widened_total == 1, 60, "the parked slot moved")
        second = (*first, ChatMessage(Role.ASSISTANT, model.decode(answer)),
                  ChatMessage(Role.USER, text_of(model, 40, "wider")))
        ids = engine.prompt_ids("", second)
        assert width_class(len(ids) + 64, engine.scheduler.max_width) == 512  # its first turn's batch is too narrow
        req = GenerationRequest(messages=second, sampling=Sampling(max_tokens=64), tenant_id="acme")
        tokens = [t async for delta in engine.generate(req) for t in delta.token_ids]
        cold = [t async for delta in plain.generate(req) for t in delta.token_ids]
        assert tokens == cold
        assert engine.load_report().slots_taken_over_total == 1 and copied == []
    finally:
        await engine.stop()
        await plain.stop()


def _going_on(model, salt: str) -> tuple[ChatMessage, ...]:
    """A conversation that has gone on before: an exchange, then a new user turn of 45 tokens."""
    return (ChatMessage(Role.USER, text_of(model, 20, f"{salt} opening")),
            ChatMessage(Role.ASSISTANT, text_of(model, 20, f"{salt} reply")),
            ChatMessage(Role.USER, text_of(model, 45, salt)))


def _shared_blocks(ids: list[int], history: list[int]) -> int:
    """Whole blocks of 8 that `ids` starts with as `history` does."""
    same = next((i for i, (a, b) in enumerate(zip(ids, history, strict=False)) if a != b), min(len(ids), len(history)))
    return same // 8


@pytest.mark.parametrize("sampling", SAMPLINGS, ids=["greedy", "seeded"])
async def test_an_answer_cached_while_it_is_decoded_leaves_a_next_turn_sent_at_once_only_the_rest(
        model, sampling) -> None:
    """With few sequences decoding, a chat answer is prefilled into a second slot as it is decoded (16
    tokens a call): when it ends that slot is parked with prefill KV up to the last call, so the next turn,
    sent the moment the answer ends, takes it over and prefills only the answer's last tokens and its new
    message. The decoding slot is never touched: both turns' tokens are a cold run's (greedy and seeded)."""
    engine, plain, _ = await _engines(model)
    try:
        first = _going_on(model, "eager")
        turn1 = GenerationRequest(messages=first, sampling=Sampling(max_tokens=48, **sampling), tenant_id="acme")
        answer = [t async for delta in engine.generate(turn1) for t in delta.token_ids]
        counters = engine.scheduler.counters
        prompt = engine.prompt_ids("", first)
        exact = 8 * ((len(prompt) - 2) // 8) + counters.eager_warm_tokens_total  # final once the answer ended
        assert len(answer) >= 24 and counters.eager_warm_tokens_total >= 16, (len(answer), counters)
        assert exact % 8 == 0

        second = (*first, ChatMessage(Role.ASSISTANT, model.decode(answer)),
                  ChatMessage(Role.USER, text_of(model, 40, "at once")))
        turn2 = GenerationRequest(messages=second, sampling=Sampling(max_tokens=16, **sampling), tenant_id="acme")
        before = counters.prefill_tokens_total
        tokens = [t async for delta in engine.generate(turn2) for t in delta.token_ids]
        computed = counters.prefill_tokens_total - before
        ids = engine.prompt_ids("", second)
        found = min(exact, 8 * _shared_blocks(ids, prompt + answer))
        assert found > len(prompt) and computed <= len(ids) - found, (computed, len(ids), found)
        assert engine.load_report().slots_taken_over_total == 1
        assert answer == [t async for delta in plain.generate(turn1) for t in delta.token_ids]
        assert tokens == [t async for delta in plain.generate(turn2) for t in delta.token_ids]
    finally:
        await engine.stop()
        await plain.stop()


async def test_a_turn_cancelled_while_its_answer_is_being_cached_gives_both_its_slots_back(model) -> None:
    """Cancelling a chat turn whose answer is being prefilled into its second slot frees that slot and its
    reservation with the first: nothing is left parked, reserved or resident."""
    engine = Engine(model, SchedulerSettings())
    await engine.start()
    try:
        first = _going_on(model, "cancel")
        req = GenerationRequest(messages=first, sampling=Sampling(max_tokens=48), tenant_id="acme")
        scheduler = engine.scheduler
        stream = engine.generate(req)
        async for _ in stream:
            if scheduler._shadows:
                break
        await stream.aclose()
        assert scheduler.counters.eager_warm_tokens_total >= 16
        await wait_until(lambda: not scheduler._running and not scheduler._shadows, 30, "the turn gone")
        await wait_until(lambda: engine.load_report().kv_cache_tokens == 0, 30, "its slots freed")
        assert scheduler.reserved_bytes == 0 and not scheduler._parked
    finally:
        await engine.stop()
