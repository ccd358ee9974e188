"""References render from finished nodes; EXTRACT / CLASSIFY answers give their fields; the Mermaid text
shows every node with its state and every dependency."""

from __future__ import annotations

from datetime import UTC, datetime

from services.common.generation import TrafficClass
from services.router.tasks import TaskKind
from services.router.types import Principal
from services.router.workflows.mermaid import mermaid
from services.router.workflows.model import NodeSpec, NodeState, NodeStatus, Workflow, WorkflowState
from services.router.workflows.template import parsed_fields, render


def test_references_render_outputs_fields_and_labels() -> None:
    text = "A={{nodes.a.output}} V={{ nodes.e.fields.verdict }} L={{nodes.c.label}} M={{nodes.e.fields.gone}}"
    assert render(text, {"a": "alpha"}, {"e": {"verdict": "B"}, "c": {"label": "yes"}}) == "A=alpha V=B L=yes M="


def test_extract_takes_the_first_json_object_and_classify_the_first_label_named() -> None:
    answer = 'Sure! {"verdict": "B is better", "score": 7, "x": 1} done'
    assert parsed_fields(TaskKind.EXTRACT, answer, ("verdict", "score"), ()) == {"verdict": "B is better", "score": "7"}
    assert parsed_fields(TaskKind.EXTRACT, "no json {here", ("verdict",), ()) == {}
    assert parsed_fields(TaskKind.CLASSIFY, "It is Negative, not positive", (), ("positive", "negative")) == {
        "label": "negative"}
    assert parsed_fields(TaskKind.SUMMARIZE, '{"a": 1}', ("a",), ()) == {}


def test_mermaid_has_each_node_its_state_and_each_edge() -> None:
    nodes = (
        NodeStatus(NodeSpec("a", prompt="x"), state=NodeState.SUCCEEDED),
        NodeStatus(NodeSpec("b", prompt="x"), state=NodeState.RUNNING),
        NodeStatus(NodeSpec('say "c"'.replace(" ", "_"), kind=TaskKind.EXTRACT, content="x", depends_on=("a", "b"))),
    )
    workflow = Workflow("wf_1", Principal("t", "k"), "", "m", WorkflowState.RUNNING, TrafficClass.INTERACTIVE,
                        datetime.now(UTC), None, None, {}, 0, nodes)
    text = mermaid(workflow)
    assert text.startswith("flowchart TD\n")
    assert 'n0["a<br/>GENERATE · succeeded"]:::succeeded' in text
    assert 'n1["b<br/>GENERATE · running"]:::running' in text
    assert 'n2["say_#quot;c#quot;<br/>EXTRACT · waiting"]:::waiting' in text
    assert "  n0 --> n2\n" in text and "  n1 --> n2\n" in text
    assert "classDef upstream_failed" in text
