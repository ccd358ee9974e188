"""What chat completions and completions share: n generations through the gateway, answered as one JSON
body or one SSE stream."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import aclosing

from fastapi import Request
from starlette.responses import Response

from services.router.http.cancellation import unless_disconnected
from services.router.http.deps import Backend, header_tags, request_contexts
from services.router.http.fanout import Fanout
from services.router.http.openai import convert
from services.router.http.openai.protocol import SamplingFields
from services.router.http.sse import EventStream
from services.router.lifecycle import Deprecation
from services.router.types import Chunk, GenerationRequest, Principal, Summary


async def answer(request: Request, backend: Backend, principal: Principal, body: SamplingFields,
                 call: GenerationRequest, chat: bool) -> Response:
    created = int(time.time())
    # the same prompt cap as the gRPC transport, before any other work (the body limit bounds the rest)
    backend.input_limits.check_prompt(
        [("prompt", call.prompt)] + [(f"messages[{i}].content", m.content) for i, m in enumerate(call.messages)])
    contexts = request_contexts(principal, convert.tags(header_tags(request), body), body.n)
    gateway = backend.gateway
    request_id = contexts[0].request_id
    if body.n == 1 and not body.stream:
        answers = convert.Collected(1)
        await unless_disconnected(request, collect_one(gateway.generate(contexts[0], call), answers))
        return completed(chat, request_id, created, answers, gateway.deprecation(call.model))
    streams: Fanout[Chunk | Summary] = Fanout([gateway.generate(ctx, call) for ctx in contexts])
    try:
        if body.stream:
            # Validated, admitted and held before the first byte: a refusal is still an HTTP status.
            await unless_disconnected(request, streams.started())
            include_usage = body.stream_options is not None and body.stream_options.include_usage
            builder = convert.ChunkBuilder(chat, request_id, created, body.model, body.n, include_usage)
            return deprecated(EventStream(convert.stream_frames(aiter(streams), builder), on_close=streams.aclose),
                              gateway.deprecation(call.model))
        answers = convert.Collected(body.n)

        async def collect() -> None:
            async for index, item in streams:
                answers.add(index, item)

        await unless_disconnected(request, collect())
    except BaseException:
        await streams.aclose()
        raise
    await streams.aclose()
    return completed(chat, request_id, created, answers, gateway.deprecation(call.model))


async def collect_one(stream: AsyncIterator[Chunk | Summary], answers: convert.Collected) -> None:
    """One generation read in this task (no pump task, no queue); the stream is closed however it ends."""
    async with aclosing(stream):  # type: ignore[type-var]
        async for item in stream:
            answers.add(0, item)


def completed(chat: bool, request_id: str, created: int, answers: convert.Collected,
              deprecation: Deprecation | None) -> Response:
    result = (convert.chat_completion if chat else convert.text_completion)(request_id, created, answers)
    # pydantic-core writes the JSON itself (no dict, then json.dumps)
    return deprecated(Response(result.model_dump_json(), media_type="application/json"), deprecation)


def deprecated(response: Response, deprecation: Deprecation | None) -> Response:
    """A request pinned to a DEPRECATED version says so: `Deprecation` (RFC 9745: `@<unix time>` of the
    deprecation, `@0` when not recorded) and, saying what to call instead, `X-AutoGLM-Deprecation`."""
    if deprecation is not None:
        since = int(deprecation.since.timestamp()) if deprecation.since is not None else 0
        response.headers["Deprecation"] = f"@{since}"
        response.headers["X-AutoGLM-Deprecation"] = deprecation.notice
    return response
