"""The OpenAI wire models: what they accept, and that what the mesh cannot honour is refused by name."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError

from services.common.generation import TrafficClass
from services.router.http.errors import validation_parts
from services.router.http.openai import convert
from services.router.http.openai.protocol import ChatCompletionRequest, CompletionRequest
from services.router.types import CachePolicy, Role

CHAT: dict[str, Any] = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def refusal(model: type, body: dict[str, Any]) -> dict[str, Any]:
    """The 400 body the API answers for `body`."""
    with pytest.raises(ValidationError) as caught:
        model.model_validate(body)
    errors = [{**e, "loc": ("body", *e["loc"])} for e in caught.value.errors()]
    status, answer = validation_parts(RequestValidationError(errors))
    assert status == 400
    return dict(answer["error"])


def test_a_full_chat_request_becomes_the_gateway_request() -> None:
    body = ChatCompletionRequest.model_validate({
        "model": "m@v2", "max_completion_tokens": 7, "max_tokens": 99, "temperature": 0, "top_p": 0.5, "seed": 3,
        "stop": "END", "user": "u-1", "context_id": "c1", "tags": {"team": "x"}, "cache_policy": "bypass",
        "traffic_class": "batch", "presence_penalty": 0, "response_format": {"type": "text"},
        "messages": [{"role": "developer", "content": "be brief"},
                     {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
                     {"role": "assistant", "content": "ok", "name": "bot"}],
    })
    req = convert.chat_request(body)
    assert [(m.role, m.content) for m in req.messages] == [(Role.SYSTEM, "be brief"), (Role.USER, "ab"),
                                                           (Role.ASSISTANT, "ok")]
    assert req.sampling.max_tokens == 7  # max_completion_tokens wins over the deprecated max_tokens
    assert (req.sampling.temperature, req.sampling.top_p, req.sampling.seed, req.sampling.stop) == (0, 0.5, 3, ("END",))
    assert (req.context_id, req.cache_policy, req.traffic_class) == ("c1", CachePolicy.BYPASS, TrafficClass.BATCH)
    assert convert.tags({"env": "prod", "team": "y"}, body) == {"env": "prod", "team": "x", "user": "u-1"}


def test_a_completion_prompt_is_raw_text_and_a_one_string_list_is_accepted() -> None:
    req = convert.completion_request(CompletionRequest.model_validate(
        {"model": "m", "prompt": ["Once upon"], "max_tokens": 5, "stop": ["\n", "."]}))
    assert (req.prompt, req.raw_prompt, req.messages, req.sampling.stop) == ("Once upon", True, (), ("\n", "."))


@pytest.mark.parametrize(("extra", "param"), [
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ({"tool_choice": "auto"}, "tool_choice"),
    ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"logprobs": True}, "logprobs"),
    ({"top_logprobs": 2}, "top_logprobs"),
    ({"presence_penalty": 0.5}, "presence_penalty"),
    ({"frequency_penalty": -1}, "frequency_penalty"),
    ({"logit_bias": {"50256": -100}}, "logit_bias"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "messages[0].content"),
    ({"messages": [{"role": "tool", "content": "42"}]}, "messages[0].role"),
    ({"audio": {"voice": "alloy"}}, "audio"),
])
def test_what_the_mesh_cannot_honour_is_refused_naming_the_field(extra: dict[str, Any], param: str) -> None:
    error = refusal(ChatCompletionRequest, {**CHAT, **extra})
    assert (error["param"], error["code"], error["type"]) == (param, "unsupported_parameter", "invalid_request_error")


@pytest.mark.parametrize(("body", "param", "code"), [
    ({**CHAT, "n": 5}, "n", "invalid_value"),
    ({**CHAT, "temperature": 3}, "temperature", "invalid_value"),
    ({**CHAT, "max_tokens": 0}, "max_tokens", "invalid_value"),
    ({**CHAT, "stop": ["a", "b", "c", "d", "e"]}, "stop", "invalid_value"),
    ({**CHAT, "messages": []}, "messages", "invalid_value"),
    ({**CHAT, "messages": [{"role": "user", "content": None}]}, "messages[0].content", "invalid_value"),
    ({**CHAT, "messages": [{"role": "robot", "content": "x"}]}, "messages[0].role", "invalid_value"),
    ({"messages": CHAT["messages"]}, "model", "invalid_value"),
    ({**CHAT, "frobnicate": 1}, "frobnicate", "unknown_parameter"),
    ({**CHAT, "user": "u" * 65}, "user", "invalid_value"),
])
def test_bad_chat_fields_are_named(body: dict[str, Any], param: str, code: str) -> None:
    error = refusal(ChatCompletionRequest, body)
    assert (error["param"], error["code"]) == (param, code)
    assert param in error["message"]


@pytest.mark.parametrize(("extra", "param"), [
    ({"prompt": [1, 2, 3]}, "prompt"), ({"prompt": ["a", "b"]}, "prompt"), ({"echo": True}, "echo"),
    ({"suffix": "end"}, "suffix"), ({"logprobs": 1}, "logprobs"), ({"best_of": 3}, "best_of"),
])
def test_completion_fields_it_cannot_honour_are_refused(extra: dict[str, Any], param: str) -> None:
    error = refusal(CompletionRequest, {"model": "m", "prompt": "x", **extra})
    assert (error["param"], error["code"]) == (param, "unsupported_parameter")
