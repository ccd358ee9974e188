"""Domain modules of the engine on their own: sampling, stop sequences, detokenisation, provider
selection and request validation."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from services.common.errors import FailedPrecondition, InvalidInput
from services.common.generation import FinishReason, Sampling
from services.common.usage import Usage
from services.inference.engine.detokenize import IncrementalDetokenizer
from services.inference.engine.engine import coalesce
from services.inference.engine.sampling import Sampler, SamplingParams, apply_repetition_penalty
from services.inference.engine.session import CPU, CUDA, choose_provider
from services.inference.engine.stop import StopMatcher
from services.inference.engine.types import Delta, GenerationRequest, StreamSettings
from services.inference.engine.validation import ModelDefaults, resolve_max_tokens, resolve_sampling


def test_greedy_picks_the_argmax_and_penalty_discourages_seen_tokens() -> None:
    logits = np.array([1.0, 3.0, 2.9, -1.0], dtype=np.float32)
    assert Sampler(SamplingParams()).choose(logits) == 1
    assert Sampler(SamplingParams(repetition_penalty=1.2)).choose(logits, seen=[1]) == 2
    row = np.array([2.0, -2.0])
    apply_repetition_penalty(row, [0, 1], 2.0)
    assert row.tolist() == [1.0, -4.0]


def test_seeded_sampling_repeats_and_top_k_top_p_restrict_the_choice() -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(size=100).astype(np.float32)
    params = SamplingParams(temperature=1.0, seed=42)
    assert [Sampler(params).choose(logits) for _ in range(3)] == [Sampler(params).choose(logits)] * 3
    top3 = set(np.argsort(-logits)[:3].tolist())
    sampler = Sampler(SamplingParams(temperature=1.5, top_k=3, seed=1))
    assert {sampler.choose(logits) for _ in range(200)} <= top3
    peaked = np.zeros(10, dtype=np.float32)
    peaked[4] = 20.0
    nucleus = Sampler(SamplingParams(temperature=1.0, top_p=0.5, seed=3))
    assert {nucleus.choose(peaked) for _ in range(50)} == {4}


def test_stop_sequences_match_across_token_boundaries() -> None:
    matcher = StopMatcher(("###", "END"))
    pieces = [matcher.push(p) for p in ["Hello #", "# wor", "ld #", "##tail"]]
    assert "".join(p.text for p in pieces) == "Hello ## world "
    assert pieces[-1].stopped and not any(p.stopped for p in pieces[:-1])
    held = StopMatcher(("END",))
    assert held.push("the EN").text == "the " and held.flush() == "EN"


def test_detokenizer_never_splits_a_utf8_character() -> None:
    data = "héllo 🐉!".encode()
    detok = IncrementalDetokenizer(lambda ids: bytes(ids).decode("utf-8", errors="replace"))
    pieces = [detok.push(b) for b in data]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) + detok.flush() == "héllo 🐉!"


def test_provider_selection_prefers_cuda_only_when_available() -> None:
    assert choose_provider("auto", [CUDA, CPU]) == CUDA
    assert choose_provider("auto", [CPU]) == CPU
    assert choose_provider("cpu", [CUDA, CPU]) == CPU
    with pytest.raises(FailedPrecondition, match="onnxruntime-gpu"):
        choose_provider("cuda", ["AzureExecutionProvider", CPU])
    with pytest.raises(ValueError, match="auto, cuda, cpu"):
        choose_provider("tpu", [CPU])


@pytest.mark.parametrize(("sampling", "field"), [
    (Sampling(temperature=-0.1), "temperature"), (Sampling(top_p=1.5), "top_p"),
    (Sampling(top_k=-1), "top_k"), (Sampling(repetition_penalty=2.5), "repetition_penalty"),
    (Sampling(stop=("x",) * 9), "stop"), (Sampling(stop=("",)), "stop"),
])
def test_out_of_range_sampling_is_rejected_naming_the_field(sampling, field) -> None:
    with pytest.raises(InvalidInput) as err:
        resolve_sampling(sampling, ModelDefaults())
    assert err.value.field == f"sampling.{field}"


def test_defaults_greedy_without_seed_and_context_window_check() -> None:
    assert resolve_sampling(Sampling(), ModelDefaults()).greedy
    assert not resolve_sampling(Sampling(seed=5), ModelDefaults(temperature=0.7)).greedy
    request = GenerationRequest(prompt="x", sampling=Sampling(max_tokens=100))
    assert resolve_max_tokens(request, 20, 120, ModelDefaults()) == 100
    with pytest.raises(InvalidInput, match=r"prompt \(21 tokens\) \+ max_tokens \(100\) = 121 exceeds .* 120"):
        resolve_max_tokens(request, 21, 120, ModelDefaults())
    unset = GenerationRequest(prompt="x")
    assert resolve_max_tokens(unset, 100, 120, ModelDefaults(max_new_tokens=256)) == 20


async def test_a_consumer_that_falls_behind_gets_the_backlog_in_one_message() -> None:
    events: asyncio.Queue[Delta] = asyncio.Queue()
    pieces = ["Once", " upon", " a", " time"]
    for i, text in enumerate(pieces):
        events.put_nowait(Delta(text, (i,)))
    events.put_nowait(Delta(".", (4,), FinishReason.LENGTH, Usage(3, 5)))
    messages = [m async for m in coalesce(events, StreamSettings())]
    assert [(m.text, m.token_ids) for m in messages] == [("Once upon a time.", (0, 1, 2, 3, 4))]
    assert messages[0].finish_reason is FinishReason.LENGTH and messages[0].usage == Usage(3, 5)


async def test_a_consumer_that_keeps_up_gets_every_token_and_limits_still_apply() -> None:
    events: asyncio.Queue[Delta] = asyncio.Queue()
    stream = coalesce(events, StreamSettings())
    for i in range(3):
        events.put_nowait(Delta(f"t{i}", (i,)))
        assert (await anext(stream)).token_ids == (i,)
    capped: asyncio.Queue[Delta] = asyncio.Queue()
    for i in range(5):
        capped.put_nowait(Delta(f"t{i}", (i,), FinishReason.STOP if i == 4 else None))
    sizes = [len(m.token_ids) async for m in coalesce(capped, StreamSettings(coalesce_tokens=1))]
    assert sizes == [1, 1, 1, 1, 1]
