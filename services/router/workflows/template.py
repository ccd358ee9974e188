"""References between nodes: `{{nodes.<id>.output}}` (a node's text), `{{nodes.<id>.fields.<name>}}` (a
field of an EXTRACT node's JSON answer) and `{{nodes.<id>.label}}` (the label a CLASSIFY node chose)."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from services.router.tasks import TaskKind

REFERENCE = re.compile(r"\{\{\s*nodes\.([^.\s}]+)\.(output|label|fields\.([^\s}]+))\s*\}\}")
NODE_ID = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,63}$")


@dataclass(frozen=True)
class Reference:
    node_id: str
    part: str  # "output", "label" or "fields"
    name: str = ""  # the field, for "fields"


def references(text: str) -> list[Reference]:
    out = []
    for match in REFERENCE.finditer(text):
        part = match.group(2)
        if part.startswith("fields."):
            out.append(Reference(match.group(1), "fields", match.group(3)))
        else:
            out.append(Reference(match.group(1), part))
    return out


def render(text: str, outputs: dict[str, str], fields: dict[str, dict[str, str]]) -> str:
    """`text` with every reference replaced by the finished node's output, label or field ("" when an
    EXTRACT answer lacked the field)."""
    def value(match: re.Match[str]) -> str:
        node, part = match.group(1), match.group(2)
        if part == "output":
            return outputs.get(node, "")
        if part == "label":
            return fields.get(node, {}).get("label", "")
        return fields.get(node, {}).get(match.group(3), "")

    return REFERENCE.sub(value, text)


def parsed_fields(kind: TaskKind, output: str, wanted: tuple[str, ...], labels: tuple[str, ...]) -> dict[str, str]:
    """The parts later nodes can reference: EXTRACT's fields from the first JSON object in the answer (a
    value that is not a string is kept as JSON), CLASSIFY's label (the first allowed label the answer
    names, case-insensitively)."""
    if kind == TaskKind.CLASSIFY:
        lowered = output.lower()
        found = [(lowered.find(label.lower()), label) for label in labels if label.lower() in lowered]
        return {"label": min(found)[1]} if found else {}
    if kind != TaskKind.EXTRACT:
        return {}
    data = _first_object(output)
    return {name: value if isinstance(value, str) else json.dumps(value)
            for name, value in data.items() if name in wanted}


def _first_object(text: str) -> dict[str, object]:
    decoder = json.JSONDecoder()
    start = text.find("{")
    while start != -1:
        try:
            value, _ = decoder.raw_decode(text, start)
        except json.JSONDecodeError:
            start = text.find("{", start + 1)
            continue
        if isinstance(value, dict):
            return value
        start = text.find("{", start + 1)
    return {}
