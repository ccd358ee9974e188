"""Python client of the public RouterService.

    client = GLMClient("ag_...")                      # router at 127.0.0.1:50051 by default
    print(client.complete("Name three colours.").text)
    for delta in client.generate("Tell me a story", max_tokens=64):
        print(delta.text, end="", flush=True)
    client.models()                                   # versions, split and default sampling

Streams are retried on UNAVAILABLE only before the first token arrived, so a caller never sees
duplicated text. Synchronous API (plain grpc channel); safe to use from scripts and notebooks.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import grpc
from google.protobuf.json_format import MessageToDict

from autoglm.common.v1 import generation_pb2
from autoglm.router.v1 import router_service_pb2 as pb2
from autoglm.router.v1 import router_service_pb2_grpc as pb2_grpc

ROLES = {
    "system": generation_pb2.CHAT_ROLE_SYSTEM,
    "user": generation_pb2.CHAT_ROLE_USER,
    "assistant": generation_pb2.CHAT_ROLE_ASSISTANT,
}
FINISH = {v: k for k, v in generation_pb2.FinishReason.items()}


@dataclass(frozen=True)
class Delta:
    """A piece of streamed text; `summary` is set on the last one."""

    text: str
    tokens: int
    summary: Completion | None = None


@dataclass(frozen=True)
class Completion:
    id: str
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    cost_micros: int
    currency: str
    model: str
    model_version: str
    trace_id: str
    cached: bool = False
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def cost(self) -> str:
        """Cost as a decimal string, e.g. '0.000123 USD' (exact: money is integer micro-units)."""
        sign = "-" if self.cost_micros < 0 else ""
        whole, micros = divmod(abs(self.cost_micros), 1_000_000)
        return f"{sign}{whole}.{micros:06d} {self.currency}".strip()


class GLMClient:
    def __init__(
        self,
        api_key: str,
        target: str = "127.0.0.1:50051",
        *,
        credentials: grpc.ChannelCredentials | None = None,
        model: str = "smollm2-135m-instruct",
        retries: int = 3,
        timeout_s: float = 300.0,
    ) -> None:
        self._metadata = (("authorization", f"Bearer {api_key}"),)
        self._channel = grpc.secure_channel(target, credentials) if credentials else grpc.insecure_channel(target)
        self._stub = pb2_grpc.RouterServiceStub(self._channel)
        self.model = model
        self.retries = retries
        self.timeout_s = timeout_s

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> GLMClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _request(
        self,
        prompt: str | None,
        messages: Sequence[Mapping[str, str]] | None,
        *,
        model: str | None,
        context_id: str,
        temperature: float | None,
        top_p: float | None,
        top_k: int | None,
        seed: int | None,
        max_tokens: int | None,
        stop: Sequence[str],
        tags: Mapping[str, str] | None,
    ) -> pb2.GenerateRequest:
        sampling = generation_pb2.SamplingParams(stop=list(stop))
        if temperature is not None:
            sampling.temperature = temperature
        if top_p is not None:
            sampling.top_p = top_p
        if top_k is not None:
            sampling.top_k = top_k
        if seed is not None:
            sampling.seed = seed
        if max_tokens is not None:
            sampling.max_tokens = max_tokens
        request = pb2.GenerateRequest(
            model=model or self.model, context_id=context_id, sampling=sampling, tags=dict(tags or {})
        )
        if messages:
            request.messages.extend(
                generation_pb2.ChatMessage(role=ROLES[m["role"]], content=m["content"]) for m in messages
            )
        else:
            request.prompt = prompt or ""
        return request

    def generate(
        self,
        prompt: str | None = None,
        *,
        messages: Sequence[Mapping[str, str]] | None = None,
        model: str | None = None,
        context_id: str = "",
        temperature: float | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        seed: int | None = None,
        max_tokens: int | None = None,
        stop: Sequence[str] = (),
        tags: Mapping[str, str] | None = None,
    ) -> Iterator[Delta]:
        """Stream the answer. Retries UNAVAILABLE with backoff, but only before the first token."""
        request = self._request(prompt, messages, model=model, context_id=context_id, temperature=temperature,
                                top_p=top_p, top_k=top_k, seed=seed, max_tokens=max_tokens, stop=stop, tags=tags)
        attempt = 0
        while True:
            received = False
            call = self._stub.Generate(request, metadata=self._metadata, timeout=self.timeout_s)
            try:
                for message in call:
                    received = True
                    summary = _completion(message, "") if message.HasField("summary") else None
                    yield Delta(text=message.delta, tokens=message.delta_tokens, summary=summary)
                return
            except grpc.RpcError as error:
                if received or error.code() != grpc.StatusCode.UNAVAILABLE or attempt >= self.retries:
                    raise
                attempt += 1
                time.sleep(random.uniform(0, min(2.0, 0.1 * 2**attempt)))
            finally:
                call.cancel()

    def complete(self, prompt: str | None = None, **kwargs: object) -> Completion:
        """The whole answer at once (streams under the hood, so retries and cancellation behave the same)."""
        parts: list[str] = []
        summary: Completion | None = None
        for delta in self.generate(prompt, **kwargs):  # type: ignore[arg-type]
            parts.append(delta.text)
            summary = delta.summary or summary
        if summary is None:
            raise RuntimeError("the stream ended without a summary")
        return Completion(**{**summary.__dict__, "text": "".join(parts)})

    def models(self) -> list[dict[str, object]]:
        """The models this key may call: versions, traffic split, healthy replicas and each version's
        default sampling (what a request gets for the sampling fields it leaves unset)."""
        reply = self._stub.ListModels(pb2.ListModelsRequest(), metadata=self._metadata, timeout=self.timeout_s)
        models = [MessageToDict(m, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)
                  for m in reply.models]
        for model in models:
            for version in model["versions"]:
                version["default_sampling"].pop("stop", None)  # never defaulted
        return models


def _completion(message: pb2.GenerateResponse, text: str) -> Completion:
    s = message.summary
    return Completion(
        id=message.id, text=text, finish_reason=FINISH.get(s.finish_reason, "FINISH_REASON_UNSPECIFIED"),
        prompt_tokens=s.usage.prompt_tokens, completion_tokens=s.usage.completion_tokens,
        cost_micros=s.cost.micros, currency=s.cost.currency_code, model=s.model, model_version=s.model_version,
        trace_id=s.trace_id, cached=s.usage.cached,
    )
