"""Render a model's jinja chat template the way transformers does (sandboxed, trimmed blocks)."""

from __future__ import annotations

from typing import Any

from jinja2.sandbox import ImmutableSandboxedEnvironment


def render_chat(template: str, messages: list[dict[str, str]], add_generation_prompt: bool = True,
                **variables: Any) -> str:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    return env.from_string(template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                            **variables)
