"""Renders a conversation through the model's own (Hugging Face style) jinja chat template."""

from __future__ import annotations

from collections.abc import Sequence

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from services.common.errors import InvalidInput
from services.inference.engine.types import ChatMessage

# ChatML, used when a model ships no template of its own.
CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _raise_exception(message: str) -> None:
    raise InvalidInput(f"the chat template rejected the messages: {message}", field="messages")


class ChatTemplate:
    def __init__(self, source: str | None, bos_token: str = "", eos_token: str = "") -> None:
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=["jinja2.ext.loopcontrols"])
        env.globals["raise_exception"] = _raise_exception
        self._template = env.from_string(source or CHATML)
        self._special = {"bos_token": bos_token, "eos_token": eos_token}

    def render(self, messages: Sequence[ChatMessage], add_generation_prompt: bool = True) -> str:
        turns = [{"role": m.role.value, "content": m.content} for m in messages]
        try:
            return self._template.render(messages=turns, add_generation_prompt=add_generation_prompt,
                                         **self._special)
        except jinja2.TemplateError as err:
            raise InvalidInput(f"the chat template could not render the messages: {err}",
                               field="messages") from err
