"""The router counts prompt tokens as the engine does, with the built model's tokenizer and chat template
(checked against the token ids the model build recorded for the golden prompts), loads them once per
version, and keeps the byte bound for a version it cannot load."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from services.common.generation import ChatMessage, Role
from services.inference.engine.model import find_default_model
from services.router.gateway import prompt_token_bound
from services.router.offload import OFF_LOOP_CHARS
from services.router.prompt_tokens import PromptTokens

GOLDEN = json.loads((Path(__file__).resolve().parents[2] / "data" / "golden.json").read_text())


@pytest.fixture(scope="module")
def build() -> Path:
    try:
        return find_default_model()
    except Exception as err:  # the model is built by `make model`, a prerequisite of `make test`
        pytest.fail(f"no built model: {err}")


def chat(text: str) -> tuple[ChatMessage, ...]:
    return (ChatMessage(Role.USER, text),)


async def test_chat_prompts_count_exactly_the_golden_prompt_ids(build: Path) -> None:
    counter = PromptTokens(prompt_token_bound, root=build.parent.parent)
    model, version = build.parent.name, build.name
    assert model == GOLDEN["model"]["name"]
    for golden in GOLDEN["prompts"]:
        messages = chat(golden["user"])
        counted = await counter.bound(model, version, len(golden["user"]), "", messages, raw=False)
        assert counted == len(golden["prompt_ids"]), golden["user"]
        assert counted < prompt_token_bound("", messages, False)


async def test_the_issue_probe_prompt_is_bounded_by_its_tokens_not_its_bytes(build: Path) -> None:
    counter = PromptTokens(prompt_token_bound, root=build.parent.parent)
    exact = await counter.bound(build.parent.name, build.name, 7, "", chat("Say hi."), raw=False)
    # system prompt + turn markers + "Say hi." + the generation prompt: far below the byte bound
    assert 0 < exact < prompt_token_bound("", chat("Say hi."), False) / 2


async def test_raw_and_large_prompts_are_counted_and_the_tokenizer_loads_once(build: Path) -> None:
    counter = PromptTokens(prompt_token_bound, root=build.parent.parent)
    model, version = build.parent.name, build.name
    first, second = await asyncio.gather(counter.counter(model, version), counter.counter(model, version))
    assert first is not None and first is second  # concurrent first requests share one load
    assert await counter.counter(model, version) is first
    large = "word " * (OFF_LOOP_CHARS // 5 + 10)  # counted on a worker thread
    raw = await counter.bound(model, version, len(large), large, (), raw=True)
    assert raw == len(first.tokenizer.encode(large, add_special_tokens=False).ids)
    assert raw < len(large.encode())
    assert await counter.bound(model, version, 2, "Hi", (), raw=True) == \
        len(first.tokenizer.encode("Hi", add_special_tokens=False).ids)


async def test_a_version_the_router_cannot_load_keeps_the_byte_bound(build: Path, tmp_path: Path) -> None:
    counter = PromptTokens(prompt_token_bound, root=build.parent.parent)
    assert await counter.bound(build.parent.name, "not-built-here", 7, "", chat("Say hi."), raw=False) == \
        prompt_token_bound("", chat("Say hi."), False)
    broken = tmp_path / "m" / "v1"
    broken.mkdir(parents=True)
    (broken / "manifest.json").write_text("{not json")
    unreadable = PromptTokens(prompt_token_bound, root=tmp_path)
    assert await unreadable.bound("m", "v1", 2, "Hi", (), raw=True) == prompt_token_bound("Hi", (), True)
