"""OpenAI wire models ↔ the gateway's types, and the builder of streamed chunks (no I/O here)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from services.common.errors import Unavailable
from services.common.generation import FinishReason, TrafficClass
from services.router import sampling_defaults
from services.router.http import sse
from services.router.http.errors import error_event
from services.router.http.openai.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    Completion,
    CompletionChoice,
    CompletionRequest,
    Cost,
    DefaultSampling,
    FinishReasonName,
    ModelCard,
    ModelVersionCard,
    SamplingFields,
    UsageInfo,
)
from services.router.registry import ModelEntry
from services.router.types import (
    CachePolicy,
    Chunk,
    GenerationRequest,
    Message,
    Role,
    Sampling,
    Summary,
)

ROLES = {"system": Role.SYSTEM, "developer": Role.SYSTEM, "user": Role.USER, "assistant": Role.ASSISTANT}
CACHE_POLICIES = {"default": CachePolicy.DEFAULT, "bypass": CachePolicy.BYPASS,
                  "allow_sampled": CachePolicy.ALLOW_SAMPLED}
TRAFFIC_CLASSES = {None: TrafficClass.UNSPECIFIED, "core": TrafficClass.CORE,
                   "interactive": TrafficClass.INTERACTIVE, "batch": TrafficClass.BATCH}
FINISH_REASONS: dict[FinishReason, FinishReasonName] = {FinishReason.STOP: "stop", FinishReason.LENGTH: "length"}


def sampling(body: SamplingFields, max_tokens: int | None) -> Sampling:
    return Sampling(temperature=body.temperature, top_p=body.top_p, top_k=body.top_k,
                    repetition_penalty=body.repetition_penalty, seed=body.seed, stop=tuple(body.stop),
                    max_tokens=max_tokens)


def tags(header_tags: dict[str, str], body: SamplingFields) -> dict[str, str]:
    """Header tags, then the body's `tags`, then `user` (recorded as the tag `user`)."""
    merged = {**header_tags, **body.tags}
    if body.user:
        merged["user"] = body.user
    return merged


def chat_request(body: ChatCompletionRequest) -> GenerationRequest:
    return GenerationRequest(
        model=body.model, messages=tuple(Message(ROLES[m.role], m.content) for m in body.messages),
        sampling=sampling(body, body.completion_limit), context_id=body.context_id,
        traffic_class=TRAFFIC_CLASSES[body.traffic_class], cache_policy=CACHE_POLICIES[body.cache_policy],
    )


def completion_request(body: CompletionRequest) -> GenerationRequest:
    """A completion continues its prompt as raw text (no chat template), as OpenAI's completions do."""
    return GenerationRequest(
        model=body.model, prompt=body.prompt, raw_prompt=True, sampling=sampling(body, body.completion_limit),
        context_id=body.context_id, traffic_class=TRAFFIC_CLASSES[body.traffic_class],
        cache_policy=CACHE_POLICIES[body.cache_policy],
    )


def finish_name(reason: FinishReason) -> FinishReasonName:
    name = FINISH_REASONS.get(reason)
    if name is None:
        raise Unavailable("the generation failed before it finished; the tokens made are billed, retry the request")
    return name


def usage_info(summaries: Sequence[Summary]) -> UsageInfo:
    prompt = sum(s.usage.prompt_tokens for s in summaries)
    completion = sum(s.usage.completion_tokens for s in summaries)
    currency = summaries[0].cost.currency_code if summaries else "USD"
    return UsageInfo(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion,
                     cost=Cost(currency=currency, micros=sum(s.cost.micros for s in summaries)),
                     cached=bool(summaries) and all(s.usage.cached for s in summaries))


@dataclass
class Collected:
    """What n non-streamed generations answered, by choice index."""

    n: int
    parts: dict[int, list[str]] = field(default_factory=dict)
    summaries: dict[int, Summary] = field(default_factory=dict)

    def add(self, index: int, item: Chunk | Summary) -> None:
        if isinstance(item, Summary):
            self.summaries[index] = item
        else:
            self.parts.setdefault(index, []).append(item.delta)

    def text(self, index: int) -> str:
        return "".join(self.parts.get(index, ()))

    def ordered(self) -> list[Summary]:
        return [self.summaries[i] for i in range(self.n)]


def chat_completion(request_id: str, created: int, answers: Collected) -> ChatCompletion:
    summaries = answers.ordered()
    return ChatCompletion(
        id=f"chatcmpl-{request_id}", created=created, model=summaries[0].model,
        choices=[ChatChoice(index=i, message=AssistantMessage(content=answers.text(i)),
                            finish_reason=finish_name(s.finish_reason)) for i, s in enumerate(summaries)],
        usage=usage_info(summaries), model_version=summaries[0].model_version,
    )


def text_completion(request_id: str, created: int, answers: Collected) -> Completion:
    summaries = answers.ordered()
    return Completion(
        id=f"cmpl-{request_id}", created=created, model=summaries[0].model,
        choices=[CompletionChoice(index=i, text=answers.text(i), finish_reason=finish_name(s.finish_reason))
                 for i, s in enumerate(summaries)],
        usage=usage_info(summaries), model_version=summaries[0].model_version,
    )


class ChunkBuilder:
    """The chunks of one streamed answer: the first delta of each choice carries the role (chat),
    `finish_reason` is null until that choice's last chunk, and with `include_usage` a last chunk has
    `choices: []` and the usage of all choices."""

    def __init__(self, chat: bool, request_id: str, created: int, model: str, n: int, include_usage: bool) -> None:
        self.chat = chat
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{request_id}"
        self.created, self.model, self.n, self.include_usage = created, model, n, include_usage
        self._started: set[int] = set()
        self._summaries: dict[int, Summary] = {}

    def _chunk(self, index: int, text: str | None, finish: FinishReasonName | None = None, model: str = "",
               version: str | None = None, role: bool = False) -> bytes:
        if self.chat:
            delta: dict[str, str] = {"role": "assistant"} if role else {}
            if text is not None:
                delta["content"] = text
            body: Any = ChatCompletionChunk(
                id=self.id, created=self.created, model=model or self.model, model_version=version,
                choices=[ChatChunkChoice(index=index, delta=delta, finish_reason=finish)])
        else:
            body = Completion(id=self.id, created=self.created, model=model or self.model, model_version=version,
                              choices=[CompletionChoice(index=index, text=text or "", finish_reason=finish)])
        return sse.event(body.model_dump_json())

    def frames(self, index: int, item: Chunk | Summary) -> list[bytes]:
        out = []
        if self.chat and index not in self._started:
            out.append(self._chunk(index, "", role=True))
        self._started.add(index)
        if isinstance(item, Summary):
            self._summaries[index] = item
            out.append(self._chunk(index, None if self.chat else "", finish_name(item.finish_reason), item.model,
                                   item.model_version))
        elif item.delta:
            out.append(self._chunk(index, item.delta))
        return out

    def usage_frame(self) -> bytes:
        summaries = [self._summaries[i] for i in sorted(self._summaries)]
        kind: Any = ChatCompletionChunk if self.chat else Completion
        body = kind(id=self.id, created=self.created, model=summaries[0].model if summaries else self.model,
                    model_version=summaries[0].model_version if summaries else None, choices=[],
                    usage=usage_info(summaries))
        return sse.event(body.model_dump_json())


async def stream_frames(items: AsyncIterator[tuple[int, Chunk | Summary]], builder: ChunkBuilder) -> AsyncIterator[bytes]:
    """SSE frames for the merged items; a failure after the first byte is one error event, then [DONE]."""
    try:
        async for index, item in items:
            for frame in builder.frames(index, item):
                yield frame
        if builder.include_usage:
            yield builder.usage_frame()
    except Exception as exc:
        yield sse.event(error_event(exc, builder.chat))
    yield sse.DONE


def model_card(model: ModelEntry, healthy: dict[str, int], created: int) -> ModelCard:
    return ModelCard(
        id=model.name, created=created, context_window=model.context_window,
        default_version=model.default_version.version,
        versions=[ModelVersionCard(version=v.version, weight_permille=v.weight_permille, stable=v.stable,
                                   healthy_replicas=healthy.get(v.version, 0),
                                   default_sampling=DefaultSampling.model_validate(
                                       sampling_defaults.as_dict(v.default_sampling)),
                                   state=v.state.name)  # type: ignore[arg-type]
                  for v in model.versions],
    )
