"""Renders a conversation through the model's own (Hugging Face style) jinja chat template.

The one renderer of the mesh: serving renders every chat request with it, and the model build records
the golden prompts (tests/data/golden.json) with it, so the prompts the model was checked against are the
prompts it is served. Its jinja settings are those of transformers' `apply_chat_template`: a sandboxed,
immutable environment with trimmed and left-stripped blocks, loop controls (`{% break %}`,
`{% continue %}`), `raise_exception`, a `tojson` filter that keeps non-ASCII text, `strftime_now`, and the
model's special tokens (`bos_token`, `eos_token`, `pad_token`) as variables. `ChatTemplate.for_model`
takes the template and the special tokens from a built model's manifest and tokenizer; a model without
a template of its own gets ChatML.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from services.common.errors import InvalidInput
from services.common.generation import ChatMessage

if TYPE_CHECKING:
    from tokenizers import Tokenizer

    from services.inference.modelbuild.manifest import Manifest

# ChatML, used when a model ships no template of its own.
CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


class TemplateRejected(jinja2.TemplateError):
    """The template itself refused the conversation (its `raise_exception(...)`)."""


def _raise_exception(message: str) -> None:
    raise TemplateRejected(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


def environment() -> ImmutableSandboxedEnvironment:
    """The jinja environment every chat template is compiled in."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


class ChatTemplate:
    def __init__(self, source: str | None, bos_token: str = "", eos_token: str = "", pad_token: str = "") -> None:
        self._template = environment().from_string(source or CHATML)
        self._special = {"bos_token": bos_token, "eos_token": eos_token, "pad_token": pad_token}

    @classmethod
    def for_model(cls, manifest: Manifest, tokenizer: Tokenizer) -> ChatTemplate:
        """The template of a built model, with its special tokens as the manifest names them."""
        tokens = manifest.tokens

        def text(token_id: int | None) -> str:
            return (tokenizer.id_to_token(token_id) or "") if token_id is not None else ""

        return cls(manifest.chat_template, bos_token=text(tokens.bos),
                   eos_token=text(tokens.eos[0] if tokens.eos else None), pad_token=text(tokens.pad))

    def render(self, messages: Sequence[ChatMessage], add_generation_prompt: bool = True) -> str:
        turns = [{"role": m.role.template_name, "content": m.content} for m in messages]
        try:
            return self._template.render(messages=turns, add_generation_prompt=add_generation_prompt,
                                         **self._special)
        except TemplateRejected as err:
            raise InvalidInput(f"the chat template rejected the messages: {err}", field="messages") from err
        except jinja2.TemplateError as err:
            raise InvalidInput(f"the chat template could not render the messages: {err}",
                               field="messages") from err
