"""A workflow as a Mermaid flowchart: one box per node (its id, kind and state), an arrow per dependency,
a colour per state."""

from __future__ import annotations

from services.router.tasks import TaskKind
from services.router.workflows.model import NodeState, Workflow

STYLE = {
    NodeState.WAITING: "fill:#eeeeee,stroke:#757575",
    NodeState.RUNNING: "fill:#bbdefb,stroke:#1565c0",
    NodeState.SUCCEEDED: "fill:#c8e6c9,stroke:#2e7d32",
    NodeState.FAILED: "fill:#ffcdd2,stroke:#c62828",
    NodeState.UPSTREAM_FAILED: "fill:#ffe0b2,stroke:#ef6c00",
    NodeState.CANCELLED: "fill:#e0e0e0,stroke:#424242,stroke-dasharray:4",
}


def _label(text: str) -> str:
    return text.replace('"', "#quot;")


def mermaid(workflow: Workflow) -> str:
    names = {node.node_id: f"n{i}" for i, node in enumerate(workflow.nodes)}
    lines = ["flowchart TD"]
    for node in workflow.nodes:
        kind = "GENERATE" if node.spec.kind == TaskKind.UNSPECIFIED else node.spec.kind.name
        state = node.state.name.lower()
        lines.append(f'  {names[node.node_id]}["{_label(node.node_id)}<br/>{kind} · {state}"]:::{state}')
    for node in workflow.nodes:
        for dependency in node.spec.depends_on:
            lines.append(f"  {names[dependency]} --> {names[node.node_id]}")
    lines += [f"  classDef {state.name.lower()} {style}" for state, style in STYLE.items()]
    return "\n".join(lines) + "\n"
