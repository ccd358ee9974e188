"""Plain data of workflows: a submitted graph of nodes, and each node's state and result."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from enum import IntEnum

from services.common.generation import TrafficClass
from services.common.usage import Usage
from services.router.tasks import LengthUnit, OutputFormat, TaskKind
from services.router.types import Message, Money, Principal, Sampling


class WorkflowState(IntEnum):
    """Mirrors autoglm.router.v1.WorkflowState."""

    UNSPECIFIED = 0
    QUEUED = 1
    RUNNING = 2
    PAUSED = 3
    SUCCEEDED = 4
    FAILED = 5
    CANCELLED = 6

    @property
    def finished(self) -> bool:
        return self in (WorkflowState.SUCCEEDED, WorkflowState.FAILED, WorkflowState.CANCELLED)


class NodeState(IntEnum):
    """Mirrors autoglm.router.v1.NodeState."""

    UNSPECIFIED = 0
    WAITING = 1
    RUNNING = 2
    SUCCEEDED = 3
    FAILED = 4
    # Not run: a node it depends on failed or was cancelled.
    UPSTREAM_FAILED = 5
    CANCELLED = 6

    @property
    def finished(self) -> bool:
        return self >= NodeState.SUCCEEDED


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = 1
    backoff_s: float = 1.0  # before the 2nd attempt; doubled for each further one


@dataclass(frozen=True)
class NodeSpec:
    """One node as submitted. kind UNSPECIFIED is a free generation of `prompt` or `messages`; a task kind
    works on `content`. Texts may hold `{{nodes.<id>.output}}`, `{{nodes.<id>.fields.<name>}}` (EXTRACT)
    and `{{nodes.<id>.label}}` (CLASSIFY)."""

    node_id: str
    kind: TaskKind = TaskKind.UNSPECIFIED
    prompt: str = ""
    messages: tuple[Message, ...] = ()
    content: str = ""
    length_unit: LengthUnit = LengthUnit.UNSPECIFIED
    length_value: int = 0
    output_format: OutputFormat = OutputFormat.UNSPECIFIED
    target_language: str = ""
    labels: tuple[str, ...] = ()
    fields: tuple[str, ...] = ()
    style: str = ""
    depends_on: tuple[str, ...] = ()
    model: str = ""
    sampling: Sampling = field(default_factory=Sampling)
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    timeout_s: float = 0.0  # 0: none (the workflow's deadline still applies)

    def texts(self) -> list[tuple[str, str]]:
        """(field, text) of every text that may hold references."""
        out = [("prompt", self.prompt), ("content", self.content)]
        out += [(f"messages[{i}].content", m.content) for i, m in enumerate(self.messages)]
        return [(name, text) for name, text in out if text]


@dataclass(frozen=True)
class NewWorkflow:
    nodes: tuple[NodeSpec, ...]
    name: str = ""
    model: str = ""  # the nodes' model unless a node names its own
    traffic_class: TrafficClass = TrafficClass.UNSPECIFIED
    deadline: datetime | None = None
    tags: dict[str, str] = field(default_factory=dict)
    max_concurrency: int = 0  # 0: the router's default
    dry_run: bool = False
    require_budget: bool = False


@dataclass(frozen=True)
class NodeStatus:
    spec: NodeSpec
    state: NodeState = NodeState.WAITING
    attempt: int = 1
    runs: int = 0  # how many times the node was started (a re-run after a restart included)
    output: str = ""
    fields: dict[str, str] = field(default_factory=dict)
    usage: Usage = field(default_factory=Usage)
    cost: Money = field(default_factory=Money)
    error_code: str = ""
    error_message: str = ""
    start_time: datetime | None = None
    end_time: datetime | None = None
    not_before: datetime | None = None  # a retry waits until then

    @property
    def node_id(self) -> str:
        return self.spec.node_id


@dataclass(frozen=True)
class Workflow:
    workflow_id: str
    principal: Principal
    name: str
    model: str
    state: WorkflowState
    traffic_class: TrafficClass
    create_time: datetime
    deadline: datetime | None
    end_time: datetime | None
    tags: dict[str, str]
    max_concurrency: int
    nodes: tuple[NodeStatus, ...]

    @property
    def usage(self) -> Usage:
        return Usage(sum(n.usage.prompt_tokens for n in self.nodes), sum(n.usage.completion_tokens for n in self.nodes))

    @property
    def cost(self) -> Money:
        currency = next((n.cost.currency_code for n in self.nodes if n.cost.micros), "USD")
        return Money(currency, sum(n.cost.micros for n in self.nodes))

    def node(self, node_id: str) -> NodeStatus:
        return next(n for n in self.nodes if n.node_id == node_id)


@dataclass(frozen=True)
class Estimate:
    """The worst case of a workflow: every node's prompt bound plus its max_tokens, at the model's price."""

    prompt_tokens: int
    completion_tokens: int
    cost: Money | None  # None: no price known for a node's model
