"""Checks of a workflow at submit: every fault is INVALID_ARGUMENT naming the field (services/common/
error_table.py maps `InvalidInput`)."""

from __future__ import annotations

import graphlib
from dataclasses import replace

from services.common.errors import InvalidInput
from services.router.tasks import TaskKind
from services.router.types import Role
from services.router.workflows.model import NewWorkflow, NodeSpec
from services.router.workflows.template import NODE_ID, references

DEFAULT_MAX_NODES = 64
MAX_ATTEMPTS = 10
MAX_BACKOFF_S = 3600.0


def validate(new: NewWorkflow, max_nodes: int = DEFAULT_MAX_NODES) -> tuple[NodeSpec, ...]:
    """The nodes with every reference added to `depends_on`, in an order that runs each node after the
    nodes it depends on. Raises InvalidInput naming the field at the first fault."""
    if not new.nodes:
        raise InvalidInput("a workflow needs at least one node", field="nodes")
    if len(new.nodes) > max_nodes:
        raise InvalidInput(f"a workflow has at most {max_nodes} nodes, got {len(new.nodes)}", field="nodes")
    if new.max_concurrency < 0:
        raise InvalidInput("max_concurrency must be >= 0 (0: the router's default)", field="max_concurrency")
    by_id: dict[str, NodeSpec] = {}
    for index, node in enumerate(new.nodes):
        where = f"nodes[{index}]"
        if not NODE_ID.match(node.node_id):
            raise InvalidInput("a node id is 1-64 letters, digits, '_' or '-', starting with a letter, got "
                               f"{node.node_id!r}", field=f"{where}.id")
        if node.node_id in by_id:
            raise InvalidInput(f"node id {node.node_id!r} is used twice", field=f"{where}.id")
        by_id[node.node_id] = node
        _check_node(node, where, new.model)
    nodes = tuple(_with_references(node, index, by_id) for index, node in enumerate(new.nodes))
    graph = {node.node_id: set(node.depends_on) for node in nodes}
    try:
        order = list(graphlib.TopologicalSorter(graph).static_order())
    except graphlib.CycleError as cycle:
        path = list(cycle.args[1])
        raise InvalidInput("the nodes depend on each other in a cycle: " + " -> ".join(path),
                           field="nodes.depends_on") from None
    position = {node_id: i for i, node_id in enumerate(order)}
    return tuple(sorted(nodes, key=lambda n: position[n.node_id]))


def _check_node(node: NodeSpec, where: str, default_model: str) -> None:
    if not (node.model or default_model):
        raise InvalidInput("model is required: on the node or on the workflow", field=f"{where}.model")
    if node.kind == TaskKind.UNSPECIFIED:
        if bool(node.prompt) == bool(node.messages):
            raise InvalidInput("a generation node sets exactly one of prompt and messages", field=f"{where}.prompt")
        for m, message in enumerate(node.messages):
            if message.role == Role.UNSPECIFIED:
                raise InvalidInput("every message needs a role (SYSTEM, USER or ASSISTANT)",
                                   field=f"{where}.messages[{m}].role")
    elif not node.content.strip():
        raise InvalidInput(f"a {node.kind.name} node needs content", field=f"{where}.content")
    elif node.prompt or node.messages:
        raise InvalidInput(f"a {node.kind.name} node works on content, not prompt or messages",
                           field=f"{where}.prompt")
    if node.kind == TaskKind.CLASSIFY and not node.labels:
        raise InvalidInput("CLASSIFY needs at least one label", field=f"{where}.labels")
    if node.kind == TaskKind.EXTRACT and not node.fields:
        raise InvalidInput("EXTRACT needs at least one field name", field=f"{where}.fields")
    if node.kind == TaskKind.TRANSLATE and not node.target_language.strip():
        raise InvalidInput("TRANSLATE needs target_language", field=f"{where}.target_language")
    if node.kind == TaskKind.REWRITE and not node.style.strip():
        raise InvalidInput("REWRITE needs a style", field=f"{where}.style")
    if node.sampling.max_tokens is not None and node.sampling.max_tokens < 1:
        raise InvalidInput("sampling.max_tokens must be >= 1", field=f"{where}.sampling.max_tokens")
    if not 1 <= node.retry.max_attempts <= MAX_ATTEMPTS:
        raise InvalidInput(f"retry.max_attempts is 1 to {MAX_ATTEMPTS}", field=f"{where}.retry.max_attempts")
    if not 0 <= node.retry.backoff_s <= MAX_BACKOFF_S:
        raise InvalidInput(f"retry.backoff is 0 to {MAX_BACKOFF_S:.0f} s", field=f"{where}.retry.backoff")
    if node.timeout_s < 0:
        raise InvalidInput("timeout must be >= 0 (0: none)", field=f"{where}.timeout")


def _with_references(node: NodeSpec, index: int, by_id: dict[str, NodeSpec]) -> NodeSpec:
    """Check `depends_on` and every reference; a referenced node becomes a dependency."""
    where = f"nodes[{index}]"
    depends = list(dict.fromkeys(node.depends_on))
    for d, dependency in enumerate(node.depends_on):
        if dependency not in by_id:
            raise InvalidInput(f"node {node.node_id!r} depends on {dependency!r}, which is not a node of this "
                               "workflow", field=f"{where}.depends_on[{d}]")
    for name, text in node.texts():
        for ref in references(text):
            target = by_id.get(ref.node_id)
            if target is None:
                raise InvalidInput(f"node {node.node_id!r} references {{{{nodes.{ref.node_id}.{ref.part}}}}}, but "
                                   f"there is no node {ref.node_id!r}", field=f"{where}.{name}")
            if ref.part == "label" and target.kind != TaskKind.CLASSIFY:
                raise InvalidInput(f"node {node.node_id!r} references the label of {ref.node_id!r}, which is not "
                                   "a CLASSIFY node", field=f"{where}.{name}")
            if ref.part == "fields" and (target.kind != TaskKind.EXTRACT or ref.name not in target.fields):
                raise InvalidInput(f"node {node.node_id!r} references field {ref.name!r} of {ref.node_id!r}, which "
                                   "is not one of its EXTRACT fields", field=f"{where}.{name}")
            if ref.node_id not in depends:
                depends.append(ref.node_id)
    if node.node_id in depends:
        raise InvalidInput(f"node {node.node_id!r} depends on itself: the nodes depend on each other in a cycle: "
                           f"{node.node_id} -> {node.node_id}", field=f"{where}.depends_on")
    return replace(node, depends_on=tuple(depends))
