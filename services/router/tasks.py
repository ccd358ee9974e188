"""RunTask templates: a declarative task becomes a fixed, reviewable chat prompt."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum

from services.common.errors import InvalidInput
from services.router.types import Message, Role


class TaskKind(IntEnum):
    UNSPECIFIED = 0
    SUMMARIZE = 1
    TRANSLATE = 2
    CLASSIFY = 3
    EXTRACT = 4
    REWRITE = 5


class OutputFormat(IntEnum):
    UNSPECIFIED = 0
    TEXT = 1
    BULLETS = 2
    JSON = 3
    MARKDOWN = 4


class LengthUnit(IntEnum):
    UNSPECIFIED = 0
    WORDS = 1
    SENTENCES = 2
    BULLETS = 3


@dataclass(frozen=True)
class TaskSpec:
    kind: TaskKind
    content: str
    length_unit: LengthUnit = LengthUnit.UNSPECIFIED
    length_value: int = 0
    output_format: OutputFormat = OutputFormat.UNSPECIFIED
    target_language: str = ""
    labels: tuple[str, ...] = ()
    fields: tuple[str, ...] = ()
    style: str = ""
    extra: dict[str, str] = field(default_factory=dict)


_FORMAT = {
    OutputFormat.UNSPECIFIED: "Answer in plain prose.",
    OutputFormat.TEXT: "Answer in plain prose.",
    OutputFormat.BULLETS: "Answer as a bulleted list, one '- ' item per line.",
    OutputFormat.JSON: "Answer with a single valid JSON value and nothing else.",
    OutputFormat.MARKDOWN: "Answer in Markdown.",
}
_UNIT = {LengthUnit.WORDS: "words", LengthUnit.SENTENCES: "sentences", LengthUnit.BULLETS: "bullet points"}


def render_task(spec: TaskSpec) -> tuple[Message, ...]:
    if not spec.content.strip():
        raise InvalidInput("content is required: the text the task works on", field="content")
    if spec.length_value < 0:
        raise InvalidInput("target_length.value must be >= 0", field="target_length.value")
    if spec.kind == TaskKind.SUMMARIZE:
        instruction = "Summarize the text below, keeping its meaning."
    elif spec.kind == TaskKind.TRANSLATE:
        if not spec.target_language.strip():
            raise InvalidInput("TRANSLATE needs target_language, e.g. 'French'", field="target_language")
        instruction = f"Translate the text below into {spec.target_language.strip()}. Output only the translation."
    elif spec.kind == TaskKind.CLASSIFY:
        if not spec.labels:
            raise InvalidInput("CLASSIFY needs at least one label", field="labels")
        instruction = "Classify the text below. Answer with exactly one of these labels: " + ", ".join(spec.labels)
    elif spec.kind == TaskKind.EXTRACT:
        if not spec.fields:
            raise InvalidInput("EXTRACT needs at least one field name", field="fields")
        instruction = "Extract these fields from the text below: " + ", ".join(spec.fields) + "."
    elif spec.kind == TaskKind.REWRITE:
        if not spec.style.strip():
            raise InvalidInput("REWRITE needs a style, e.g. 'formal'", field="style")
        instruction = f"Rewrite the text below in a {spec.style.strip()} style."
    else:
        raise InvalidInput(
            "kind is required: SUMMARIZE, TRANSLATE, CLASSIFY, EXTRACT or REWRITE", field="kind"
        )
    parts = [instruction]
    if spec.length_value and spec.length_unit in _UNIT:
        parts.append(f"Use at most {spec.length_value} {_UNIT[spec.length_unit]}.")
    if spec.kind != TaskKind.CLASSIFY:
        parts.append(_FORMAT[spec.output_format])
    system = Message(Role.SYSTEM, "You are a precise assistant that follows instructions exactly.")
    user = Message(Role.USER, " ".join(parts) + "\n\nText:\n" + spec.content)
    return (system, user)
