"""SSE framing of streamed answers against golden transcripts: role first, finish_reason null until the
last chunk of a choice, the usage chunk with `choices: []`, one error event then [DONE] after a failure."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import pytest

from services.common.errors import BudgetExceeded, Unavailable
from services.common.generation import FinishReason
from services.common.usage import Usage
from services.router.http import sse
from services.router.http.openai.convert import ChunkBuilder, stream_frames
from services.router.types import Chunk, Money, Summary

SUMMARY = Summary(FinishReason.LENGTH, Usage(5, 2), Money("USD", 42), "tiny", "v7", "t" * 32, 3)


async def items(*values: tuple[int, Chunk | Summary], error: Exception | None = None
                ) -> AsyncIterator[tuple[int, Chunk | Summary]]:
    for value in values:
        yield value
    if error is not None:
        raise error


async def transcript(stream: AsyncIterator[bytes]) -> list[object]:
    events: list[object] = []
    async for frame in stream:
        assert frame.startswith(b"data: ") and frame.endswith(b"\n\n") and frame.count(b"\n") == 2
        payload = frame[len(b"data: "):-2]
        events.append("[DONE]" if payload == b"[DONE]" else json.loads(payload))
    return events


def test_an_event_is_one_data_line() -> None:
    assert sse.event('{"a": 1}') == b'data: {"a": 1}\n\n'
    with pytest.raises(ValueError):
        sse.event("two\nlines")


async def test_chat_stream_transcript_with_usage() -> None:
    builder = ChunkBuilder(True, "r1", 1700000000, "tiny", 1, include_usage=True)
    events = await transcript(stream_frames(items((0, Chunk("Hel", 1)), (0, Chunk("lo", 1)), (0, SUMMARY)), builder))
    base = {"id": "chatcmpl-r1", "object": "chat.completion.chunk", "created": 1700000000, "model": "tiny",
            "usage": None}

    def chunk(delta: dict[str, str], finish: str | None = None, version: str | None = None) -> dict[str, object]:
        return {**base, "model_version": version,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]}

    assert events == [
        chunk({"role": "assistant", "content": ""}), chunk({"content": "Hel"}), chunk({"content": "lo"}),
        chunk({}, "length", "v7"),
        {**base, "model_version": "v7", "choices": [],
         "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7,
                   "cost": {"currency": "USD", "micros": 42}, "cached": False}},
        "[DONE]",
    ]


async def test_completion_stream_has_no_role_and_no_usage_chunk_unless_asked() -> None:
    builder = ChunkBuilder(False, "r2", 1, "tiny", 1, include_usage=False)
    events = await transcript(stream_frames(items((0, Chunk("Once", 1)), (0, SUMMARY)), builder))
    assert [e["object"] for e in events[:-1]] == ["text_completion"] * 2  # type: ignore[index]
    assert [e["choices"][0]["text"] for e in events[:-1]] == ["Once", ""]  # type: ignore[index]
    assert [e["choices"][0]["finish_reason"] for e in events[:-1]] == [None, "length"]  # type: ignore[index]
    assert events[-1] == "[DONE]"


async def test_a_failure_after_the_first_byte_is_one_error_event_then_done() -> None:
    builder = ChunkBuilder(True, "r3", 1, "tiny", 1, include_usage=True)
    events = await transcript(stream_frames(items((0, Chunk("a", 1)), error=Unavailable("replica failed")), builder))
    assert events[-2] == {"error": {"message": "replica failed", "type": "server_error", "param": None,
                                    "code": "service_unavailable"}}
    assert events[-1] == "[DONE]"
    budget = await transcript(stream_frames(items(error=BudgetExceeded("budget b1 exhausted")), builder))
    assert budget[0]["error"]["code"] == "insufficient_quota" and budget[1] == "[DONE]"  # type: ignore[index]


async def test_an_unexpected_failure_mid_stream_says_nothing_internal() -> None:
    builder = ChunkBuilder(True, "r4", 1, "tiny", 1, include_usage=False)
    events = await transcript(stream_frames(items((0, Chunk("a", 1)), error=KeyError("/secret/path")), builder))
    assert "secret" not in json.dumps(events) and events[-2]["error"]["code"] == "internal_error"  # type: ignore[index]


async def test_a_finish_by_error_is_an_error_event_not_a_finish_reason() -> None:
    failed = Summary(FinishReason.ERROR, Usage(5, 1), Money(), "tiny", "v7", "", 1)
    events = await transcript(stream_frames(items((0, Chunk("a", 1)), (0, failed)),
                                            ChunkBuilder(True, "r5", 1, "tiny", 1, False)))
    assert events[-2]["error"]["type"] == "server_error" and events[-1] == "[DONE]"  # type: ignore[index]
