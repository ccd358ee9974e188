"""OpenAI's request and response bodies as pydantic models (they also publish `/openapi.json`).

Extra-field policy: a field these models do not know is refused (400 `unknown_parameter` naming it),
and a known OpenAI field the mesh cannot honour (`tools`, `logprobs`, images, non-zero penalties, …) is
refused with `unsupported_parameter` naming it — nothing is silently ignored. Validation errors carry
the parameter's path in their location; `services.router.http.errors` turns them into the 400 body.

Extensions (OpenAI clients send them through `extra_body`): `context_id`, `tags`, `cache_policy`,
`traffic_class`, `top_k`, `repetition_penalty`; answers add `usage.cost` and `model_version`.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

MAX_N = 4
MAX_STOP = 4
MAX_USER_LENGTH = 64


def unsupported(message: str) -> PydanticCustomError:
    return PydanticCustomError("unsupported_parameter", message)


def _invalid(message: str) -> PydanticCustomError:
    return PydanticCustomError("invalid_value", message)


class WireModel(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(WireModel):
    include_usage: bool = False


class ChatMessage(WireModel):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    # A string, or content parts of type "text" (joined); validated into plain text.
    content: str = ""
    name: str | None = None

    @field_validator("role")
    @classmethod
    def _role(cls, role: str) -> str:
        if role in ("tool", "function"):
            raise unsupported(f"role {role!r} needs tool calling, which this server does not support")
        return role

    @field_validator("content", mode="before")
    @classmethod
    def _content(cls, value: Any) -> str:
        if isinstance(value, str):
            return value
        if value is None:
            raise _invalid("content is required (a string or a list of text parts)")
        if not isinstance(value, list):
            raise _invalid("content must be a string or a list of text parts")
        texts = []
        for index, part in enumerate(value):
            if not isinstance(part, dict) or not isinstance(part.get("type"), str):
                raise _invalid(f"content part {index} must be an object with a 'type'")
            if part["type"] != "text":
                raise unsupported(f"content part {index} has type {part['type']!r}; this server accepts text parts"
                                  " only (no images, audio or files)")
            if not isinstance(part.get("text"), str) or set(part) - {"type", "text"}:
                raise _invalid(f"content part {index} must be {{'type': 'text', 'text': '...'}}")
            texts.append(part["text"])
        return "".join(texts)


def _lone_surrogate(value: Any, path: str) -> str | None:
    """The path of the first string holding a lone UTF-16 surrogate (JSON's "\\ud800", or the CESU bytes
    Python's JSON decoder lets through): text no model, tokenizer or protobuf can carry."""
    if isinstance(value, str):
        return None if value.isascii() or _encodable(value) else path
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        if isinstance(key, str) and _lone_surrogate(key, path) is not None:
            return path or "body"
        found = _lone_surrogate(item, f"{path}[{key}]" if isinstance(key, int) else f"{path}.{key}" if path else key)
        if found is not None:
            return found
    return None


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")  # refuses exactly the surrogates, at C speed
    except UnicodeEncodeError:
        return False
    return True


def _all_encodable(value: Any) -> bool:
    """No string anywhere in `value` holds a surrogate (the check every body gets; the path is looked
    for only when one does)."""
    if isinstance(value, str):
        return value.isascii() or _encodable(value)
    if isinstance(value, dict):
        for key, item in value.items():
            if not (_all_encodable(key) and _all_encodable(item)):
                return False
    elif isinstance(value, list):
        for item in value:
            if not _all_encodable(item):
                return False
    return True


class SamplingFields(WireModel):
    """Fields chat completions and completions share."""

    @model_validator(mode="before")
    @classmethod
    def _valid_unicode(cls, data: Any) -> Any:
        where = None if _all_encodable(data) else _lone_surrogate(data, "")
        if where is not None:
            raise _invalid(f"{where} is not valid Unicode text (it holds a lone surrogate such as \\ud800); "
                           "send UTF-8 text")
        return data

    model: str = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    n: int = Field(default=1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: list[str] = Field(default_factory=list)
    seed: int | None = Field(default=None, ge=0, lt=2**63)
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = Field(default=None, max_length=MAX_USER_LENGTH)
    # Extensions.
    context_id: str = ""
    tags: dict[str, str] = Field(default_factory=dict)
    cache_policy: Literal["default", "bypass", "allow_sampled"] = "default"
    traffic_class: Literal["core", "interactive", "batch"] | None = None
    top_k: int | None = Field(default=None, ge=0)
    repetition_penalty: float | None = Field(default=None, gt=0)

    @field_validator("stop", mode="before")
    @classmethod
    def _stop(cls, value: Any) -> Any:
        if value is None:
            return []
        if isinstance(value, str):
            return [value]
        if isinstance(value, list) and len(value) > MAX_STOP:
            raise _invalid(f"at most {MAX_STOP} stop sequences")
        return value

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _penalty(cls, value: float | None) -> float | None:
        if value:
            raise unsupported("only 0 is supported; use repetition_penalty (an extension) to discourage repeats")
        return value

    @field_validator("logit_bias")
    @classmethod
    def _logit_bias(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        if value:
            raise unsupported("logit_bias is not supported")
        return value


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    tools: list[Any] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None  # meaningless without tools, which are refused
    functions: list[Any] | None = None
    function_call: Any = None
    response_format: dict[str, Any] | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    modalities: list[str] | None = None
    audio: Any = None
    service_tier: Literal["auto", "default"] | None = None
    store: bool | None = None

    @field_validator("tools", "functions")
    @classmethod
    def _tools(cls, value: list[Any] | None) -> list[Any] | None:
        if value:
            raise unsupported("tool and function calling is not supported")
        return value

    @field_validator("tool_choice", "function_call")
    @classmethod
    def _tool_choice(cls, value: Any) -> Any:
        if value not in (None, "none"):
            raise unsupported("tool and function calling is not supported")
        return value

    @field_validator("response_format")
    @classmethod
    def _response_format(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is not None and value != {"type": "text"}:
            raise unsupported("only {'type': 'text'} is supported (no JSON mode or JSON schema)")
        return value

    @field_validator("logprobs")
    @classmethod
    def _logprobs(cls, value: bool | None) -> bool | None:
        if value:
            raise unsupported("logprobs are not supported")
        return value

    @field_validator("top_logprobs")
    @classmethod
    def _top_logprobs(cls, value: int | None) -> int | None:
        if value:
            raise unsupported("logprobs are not supported")
        return value

    @field_validator("modalities")
    @classmethod
    def _modalities(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and value != ["text"]:
            raise unsupported("only the text modality is supported")
        return value

    @field_validator("audio")
    @classmethod
    def _audio(cls, value: Any) -> Any:
        if value is not None:
            raise unsupported("audio output is not supported")
        return value

    @field_validator("store")
    @classmethod
    def _store(cls, value: bool | None) -> bool | None:
        if value:
            raise unsupported("stored completions are not supported")
        return value

    @property
    def completion_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(SamplingFields):
    # A string, or a list holding one string.
    prompt: str = Field(min_length=1)
    logprobs: int | None = None
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt(cls, value: Any) -> Any:
        if isinstance(value, list):
            if len(value) == 1 and isinstance(value[0], str):
                return value[0]
            if value and all(isinstance(v, int) for v in value):
                raise unsupported("token-id prompts are not supported; send the prompt as text")
            raise unsupported("send one prompt per request (a string or a list of one string)")
        return value

    @field_validator("logprobs")
    @classmethod
    def _logprobs(cls, value: int | None) -> int | None:
        if value is not None:
            raise unsupported("logprobs are not supported")
        return value

    @field_validator("echo")
    @classmethod
    def _echo(cls, value: bool) -> bool:
        if value:
            raise unsupported("echo is not supported")
        return value

    @field_validator("suffix")
    @classmethod
    def _suffix(cls, value: str | None) -> str | None:
        if value:
            raise unsupported("suffix (insertion) is not supported")
        return value

    @field_validator("best_of")
    @classmethod
    def _best_of(cls, value: int | None) -> int | None:
        if value is not None and value != 1:
            raise unsupported("best_of is not supported; use n")
        return value

    @property
    def completion_limit(self) -> int | None:
        return self.max_tokens


# --- answers -------------------------------------------------------------------------------------------


class Cost(BaseModel):
    currency: str
    micros: int


class UsageInfo(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    cost: Cost  # extension: what the request cost, in integer micro-units of `currency`
    cached: bool = False  # extension: answered from the response cache (as gRPC's Usage.cached)


FinishReasonName = Literal["stop", "length"]


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: FinishReasonName
    logprobs: None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo
    model_version: str  # extension: the version that answered (canary splits)
    system_fingerprint: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: dict[str, str]
    finish_reason: FinishReasonName | None = None
    logprobs: None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    model_version: str | None = None
    usage: UsageInfo | None = None


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: FinishReasonName | None = None
    logprobs: None = None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None
    model_version: str | None = None
    system_fingerprint: str | None = None


class DefaultSampling(BaseModel):
    """What a request to this version gets for each of these fields it leaves unset (null: no default;
    an explicit temperature 0 stays greedy)."""

    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    repetition_penalty: float | None = None


class ModelVersionCard(BaseModel):
    version: str
    weight_permille: int
    stable: bool
    healthy_replicas: int
    default_sampling: DefaultSampling
    # Where the version is in its life: ACTIVE takes unpinned traffic; DEPRECATED serves only requests
    # pinned to it ("model@version"); DRAFT, PENDING_APPROVAL and RETIRED serve none.
    state: Literal["DRAFT", "PENDING_APPROVAL", "ACTIVE", "DEPRECATED", "RETIRED"] = "ACTIVE"


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "autoglm"
    context_window: int
    default_version: str
    versions: list[ModelVersionCard]  # extension: versions and canary split as the router sees them


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorBody(BaseModel):
    error: ErrorInfo
