"""Checks a generation request and resolves its defaults; every failure is an InvalidInput that
names the field and the allowed range."""

from __future__ import annotations

from dataclasses import dataclass

from services.common.errors import InvalidInput
from services.common.generation import Sampling
from services.inference.engine.sampling import SamplingParams
from services.inference.engine.types import GenerationRequest

MAX_STOP_SEQUENCES = 8
MAX_STOP_BYTES = 64


@dataclass(frozen=True)
class ModelDefaults:
    """Defaults from the model's generation config."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 256


def check_input(prompt: str, messages: tuple[object, ...]) -> None:
    if bool(prompt) == bool(messages):
        raise InvalidInput(
            "exactly one of prompt and messages must be set"
            + (" (both were)" if prompt else " (neither was)"),
            field="prompt",
        )


def resolve_sampling(sampling: Sampling, defaults: ModelDefaults) -> SamplingParams:
    """Ranges from the contract: temperature 0 or (0, 2], top_p (0, 1], top_k >= 0, penalty [1, 2]."""
    temperature = sampling.temperature
    if temperature is None:
        temperature = defaults.temperature if sampling.seed is not None else 0.0
    if not (temperature == 0.0 or 0.0 < temperature <= 2.0):
        raise InvalidInput(f"sampling.temperature must be 0 (greedy) or in (0, 2], got {temperature:g}",
                           field="sampling.temperature")
    top_p = defaults.top_p if sampling.top_p is None else sampling.top_p
    if not 0.0 < top_p <= 1.0:
        raise InvalidInput(f"sampling.top_p must be in (0, 1], got {top_p:g}", field="sampling.top_p")
    top_k = defaults.top_k if sampling.top_k is None else sampling.top_k
    if top_k < 0:
        raise InvalidInput(f"sampling.top_k must be >= 0 (0 disables it), got {top_k}", field="sampling.top_k")
    penalty = 1.0 if sampling.repetition_penalty is None else sampling.repetition_penalty
    if not 1.0 <= penalty <= 2.0:
        raise InvalidInput(f"sampling.repetition_penalty must be in [1, 2], got {penalty:g}",
                           field="sampling.repetition_penalty")
    if len(sampling.stop) > MAX_STOP_SEQUENCES:
        raise InvalidInput(f"sampling.stop holds {len(sampling.stop)} sequences; at most {MAX_STOP_SEQUENCES}",
                           field="sampling.stop")
    for stop in sampling.stop:
        if not stop or len(stop.encode()) > MAX_STOP_BYTES:
            raise InvalidInput(f"each stop sequence must be 1 to {MAX_STOP_BYTES} bytes, got {stop!r}",
                               field="sampling.stop")
    return SamplingParams(temperature=float(temperature), top_p=float(top_p), top_k=int(top_k),
                          repetition_penalty=float(penalty), seed=sampling.seed)


def resolve_max_tokens(request: GenerationRequest, prompt_tokens: int, context_window: int,
                       defaults: ModelDefaults) -> int:
    """max_tokens checked against the context window; unset = the default, capped by what is left."""
    asked = request.sampling.max_tokens
    room = context_window - prompt_tokens
    if asked is None:
        if room < 1:
            raise InvalidInput(
                f"the prompt has {prompt_tokens} tokens and leaves no room in the model's context window "
                f"of {context_window} tokens", field="prompt")
        return min(defaults.max_new_tokens, room)
    if asked < 1:
        raise InvalidInput(f"sampling.max_tokens must be >= 1, got {asked}", field="sampling.max_tokens")
    if prompt_tokens + asked > context_window:
        raise InvalidInput(
            f"prompt ({prompt_tokens} tokens) + max_tokens ({asked}) = {prompt_tokens + asked} exceeds the "
            f"model's context window of {context_window} tokens", field="sampling.max_tokens")
    return asked
