"""Submit-time checks of a workflow: the error names the field (and for a cycle, its nodes)."""

from __future__ import annotations

import pytest

from services.common.error_table import row_for
from services.common.errors import InvalidInput
from services.router.tasks import TaskKind
from services.router.types import Sampling
from services.router.workflows.model import NewWorkflow, NodeSpec, RetryPolicy
from services.router.workflows.validate import validate


def gen(node_id: str, prompt: str = "hi", *depends: str) -> NodeSpec:
    return NodeSpec(node_id, prompt=prompt, depends_on=depends)


def refused(*nodes: NodeSpec, max_nodes: int = 64, **fields: object) -> InvalidInput:
    with pytest.raises(InvalidInput) as error:
        validate(NewWorkflow(nodes=nodes, model="m", **fields), max_nodes)  # type: ignore[arg-type]
    assert row_for(error.value).grpc == "INVALID_ARGUMENT"
    return error.value


def test_nodes_come_after_what_they_depend_on_and_references_are_dependencies() -> None:
    nodes = validate(NewWorkflow(model="m", nodes=(
        gen("verdict", "Judge {{nodes.compare.output}}"),
        gen("compare", "A: {{nodes.a.output}} B: {{ nodes.b.output }}"),
        gen("a"), gen("b"),
    )))
    order = [n.node_id for n in nodes]
    assert order.index("compare") > max(order.index("a"), order.index("b"))
    assert order.index("verdict") > order.index("compare")
    by_id = {n.node_id: n for n in nodes}
    assert set(by_id["compare"].depends_on) == {"a", "b"} and by_id["verdict"].depends_on == ("compare",)


def test_a_cycle_is_refused_naming_its_nodes() -> None:
    error = refused(gen("a", "x", "c"), gen("b", "x", "a"), gen("c", "{{nodes.b.output}}"), gen("zeta"))
    assert error.field == "nodes.depends_on"
    cycle = error.message.split(": ", 1)[1].split(" -> ")
    assert set(cycle) == {"a", "b", "c"} and cycle[0] == cycle[-1] and "zeta" not in error.message


def test_a_node_depending_on_itself_is_a_cycle() -> None:
    assert "a -> a" in refused(gen("a", "{{nodes.a.output}}")).message


def test_unknown_references_name_the_node_and_the_field() -> None:
    error = refused(gen("a"), gen("b", "Use {{nodes.nope.output}}"))
    assert error.field == "nodes[1].prompt" and "'b'" in error.message and "'nope'" in error.message
    assert refused(gen("a", "x", "ghost")).field == "nodes[0].depends_on[0]"
    content = refused(gen("a"), NodeSpec("s", kind=TaskKind.SUMMARIZE, content="{{nodes.zz.output}}"))
    assert content.field == "nodes[1].content"


def test_parsed_fields_are_checked_against_the_referenced_node() -> None:
    extract = NodeSpec("e", kind=TaskKind.EXTRACT, content="text", fields=("verdict",))
    classify = NodeSpec("c", kind=TaskKind.CLASSIFY, content="text", labels=("yes", "no"))
    validate(NewWorkflow(model="m", nodes=(extract, classify,
                                           gen("x", "{{nodes.e.fields.verdict}} {{nodes.c.label}}"))))
    assert refused(extract, gen("x", "{{nodes.e.fields.other}}")).field == "nodes[1].prompt"
    assert "CLASSIFY" in refused(extract, gen("x", "{{nodes.e.label}}")).message


def test_duplicate_ids_size_and_node_fields_are_named() -> None:
    assert refused(gen("a"), gen("a")).field == "nodes[1].id"
    assert refused(gen("bad id")).field == "nodes[0].id"
    error = refused(gen("a"), gen("b"), gen("c"), max_nodes=2)
    assert error.field == "nodes" and "at most 2" in error.message
    assert refused().field == "nodes"
    assert refused(NodeSpec("a")).field == "nodes[0].prompt"
    assert refused(NodeSpec("a", kind=TaskKind.SUMMARIZE)).field == "nodes[0].content"
    assert refused(NodeSpec("a", kind=TaskKind.CLASSIFY, content="t")).field == "nodes[0].labels"
    assert refused(gen("a").__class__("a", prompt="p", retry=RetryPolicy(0))).field == "nodes[0].retry.max_attempts"
    assert refused(NodeSpec("a", prompt="p", sampling=Sampling(max_tokens=0))).field == "nodes[0].sampling.max_tokens"
    assert refused(gen("a"), max_concurrency=-1).field == "max_concurrency"
    with pytest.raises(InvalidInput) as no_model:
        validate(NewWorkflow(nodes=(gen("a"),)))
    assert no_model.value.field == "nodes[0].model"
