"""Conversions between the workflow messages of autoglm.router.v1 and services/router/workflows' plain
data (the servicer's half of the workflow API; the domain never sees protobuf)."""

from __future__ import annotations

from datetime import UTC

from autoglm.router.v1 import router_service_pb2 as pb2
from services.common.generation import TrafficClass
from services.router.convert import enum_value, messages, money, sampling, timestamp, usage
from services.router.tasks import LengthUnit, OutputFormat, TaskKind
from services.router.workflows.mermaid import mermaid
from services.router.workflows.model import (
    Estimate,
    NewWorkflow,
    NodeSpec,
    NodeStatus,
    RetryPolicy,
    Workflow,
    WorkflowState,
)


def node_spec(node: pb2.WorkflowNode, index: int) -> NodeSpec:
    where = f"nodes[{index}]"
    retry = RetryPolicy(
        max_attempts=node.retry.max_attempts or 1,
        backoff_s=node.retry.backoff.ToTimedelta().total_seconds() if node.retry.HasField("backoff") else 1.0,
    )
    return NodeSpec(
        node_id=node.id, kind=enum_value(TaskKind, node.kind, f"{where}.kind"), prompt=node.prompt,
        messages=messages(node.messages), content=node.content,
        length_unit=enum_value(LengthUnit, node.target_length.unit, f"{where}.target_length.unit"),
        length_value=node.target_length.value,
        output_format=enum_value(OutputFormat, node.output_format, f"{where}.output_format"),
        target_language=node.target_language, labels=tuple(node.labels), fields=tuple(node.fields), style=node.style,
        depends_on=tuple(node.depends_on), model=node.model, sampling=sampling(node.sampling), retry=retry,
        timeout_s=node.timeout.ToTimedelta().total_seconds() if node.HasField("timeout") else 0.0,
    )


def new_workflow(req: pb2.SubmitWorkflowRequest) -> NewWorkflow:
    return NewWorkflow(
        nodes=tuple(node_spec(n, i) for i, n in enumerate(req.nodes)), name=req.name, model=req.model,
        traffic_class=enum_value(TrafficClass, req.traffic_class, "traffic_class"),
        deadline=req.deadline.ToDatetime(tzinfo=UTC) if req.HasField("deadline") else None, tags=dict(req.tags),
        max_concurrency=req.max_concurrency, dry_run=req.dry_run, require_budget=req.require_budget,
    )


def texts(req: pb2.SubmitWorkflowRequest) -> list[tuple[str, str]]:
    """(field, text) of every node's text meant for the model, for the size limits."""
    out = []
    for i, node in enumerate(req.nodes):
        out += [(f"nodes[{i}].prompt", node.prompt), (f"nodes[{i}].content", node.content)]
        out += [(f"nodes[{i}].messages[{m}].content", msg.content) for m, msg in enumerate(node.messages)]
    return out


def node_status(node: NodeStatus, with_output: bool = True) -> pb2.NodeStatus:
    return pb2.NodeStatus(
        id=node.node_id, state=int(node.state), kind=int(node.spec.kind),  # type: ignore[arg-type]
        depends_on=node.spec.depends_on, attempt=node.attempt, runs=node.runs,
        output=node.output if with_output else "", fields=node.fields if with_output else {},
        usage=usage(node.usage), cost=money(node.cost), error_code=node.error_code,
        error_message=node.error_message, start_time=timestamp(node.start_time), end_time=timestamp(node.end_time),
    )


def workflow(value: Workflow, detail: bool = True) -> pb2.Workflow:
    return pb2.Workflow(
        workflow_id=value.workflow_id, name=value.name, state=int(value.state),  # type: ignore[arg-type]
        traffic_class=int(value.traffic_class), create_time=timestamp(value.create_time),  # type: ignore[arg-type]
        deadline=timestamp(value.deadline), end_time=timestamp(value.end_time), tags=value.tags,
        max_concurrency=value.max_concurrency, nodes=[node_status(n, detail) for n in value.nodes],
        usage=usage(value.usage), cost=money(value.cost), mermaid=mermaid(value) if detail else "",
    )


def estimate(value: Estimate) -> pb2.WorkflowEstimate:
    return pb2.WorkflowEstimate(prompt_tokens=value.prompt_tokens, completion_tokens=value.completion_tokens,
                                cost=money(value.cost) if value.cost is not None else None)


def state(value: int) -> WorkflowState:
    return enum_value(WorkflowState, value, "state")
