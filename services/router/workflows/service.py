"""The public operations on workflows: submit (validated, estimated, optionally budget-checked), get, list,
cancel and watch. A workflow belongs to the tenant that submitted it: other tenants get NOT_FOUND."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime

from services.common.errors import DomainError, FailedPrecondition, InvalidInput, NotFound
from services.common.generation import TrafficClass
from services.router.types import Money, Principal
from services.router.workflows.model import Estimate, NewWorkflow, NodeSpec, NodeStatus, Workflow, WorkflowState
from services.router.workflows.runner import WorkflowRunner
from services.router.workflows.store import WorkflowStore
from services.router.workflows.template import references
from services.router.workflows.validate import validate

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 500
TEMPLATE_TOKENS = 128  # a task's instructions, the system turn and the chat template around its text
WATCH_POLL_S = 1.0  # also follows changes another router made

Quote = Callable[[str, int, int], Money | None]
# Raises (BudgetExceeded) unless the tenant's budget can hold this much of `model` now.
Cover = Callable[[Principal, str, int, int, TrafficClass], Awaitable[None]]


def estimate(nodes: tuple[NodeSpec, ...], default_model: str, default_max_tokens: int,
             quote: Quote) -> tuple[Estimate, dict[str, tuple[int, int]]]:
    """The worst case: a node's prompt is at most its text's bytes (a token is at least one byte), the
    template, and the whole answer of each node it references; it answers at most max_tokens. Also the
    totals per model."""
    answer = {n.node_id: n.sampling.max_tokens or default_max_tokens for n in nodes}
    per_model: dict[str, tuple[int, int]] = {}
    for node in nodes:
        prompt = TEMPLATE_TOKENS + sum(len(t.encode()) for _, t in node.texts())
        prompt += sum(answer[r.node_id] for _, text in node.texts() for r in references(text))
        model = node.model or default_model
        p, c = per_model.get(model, (0, 0))
        per_model[model] = (p + prompt, c + answer[node.node_id])
    cost: Money | None = Money()
    for model, (p, c) in per_model.items():
        priced = quote(model, p, c)
        cost = None if priced is None or cost is None else Money(priced.currency_code, cost.micros + priced.micros)
    return Estimate(sum(p for p, _ in per_model.values()), sum(c for _, c in per_model.values()), cost), per_model


class Workflows:
    def __init__(
        self,
        store: WorkflowStore,
        runner: WorkflowRunner,
        check_model: Callable[[Principal, str], None],
        check_tags: Callable[[dict[str, str]], None],
        traffic_class: Callable[[TrafficClass, Principal], TrafficClass],
        quote: Quote,
        cover: Cover,
        default_max_tokens: int = 256,
        wallclock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._store = store
        self._runner = runner
        self._check_model = check_model
        self._check_tags = check_tags
        self._traffic_class = traffic_class
        self._quote = quote
        self._cover = cover
        self._default_max_tokens = default_max_tokens
        self._wallclock = wallclock

    async def submit(self, principal: Principal, new: NewWorkflow) -> tuple[Workflow | None, Estimate]:
        nodes = validate(new, self._runner.settings.max_nodes)
        checked: set[str] = set()
        for index, node in enumerate(new.nodes):
            model = node.model or new.model
            if model in checked:
                continue
            try:
                self._check_model(principal, model)
            except DomainError as error:  # the same refusal, naming the field that chose the model
                raise type(error)(error.message, reason=error.reason, metadata=error.metadata,
                                  field=f"nodes[{index}].model" if node.model else "model") from None
            checked.add(model)
        self._check_tags({**new.tags, "workflow": "w", "workflow_node": "n"})
        traffic = self._traffic_class(new.traffic_class, principal)
        if new.deadline is not None and new.deadline <= self._wallclock():
            raise InvalidInput("deadline is in the past", field="deadline")
        worst, per_model = estimate(nodes, new.model, self._default_max_tokens, self._quote)
        if new.require_budget:
            for model, (prompt, completion) in per_model.items():
                await self._cover(principal, model, prompt, completion, traffic)
        if new.dry_run:
            return None, worst
        workflow_id = f"wf_{uuid.uuid4().hex[:24]}"
        cap = new.max_concurrency or self._runner.settings.default_max_concurrency
        workflow = self._store.create(workflow_id, principal, new, nodes, traffic, cap, self._wallclock())
        self._runner.wake()
        return workflow, worst

    def get(self, principal: Principal, workflow_id: str) -> Workflow:
        if not workflow_id:
            raise InvalidInput("workflow_id is required", field="workflow_id")
        workflow = self._store.get(workflow_id)
        if workflow is None or workflow.principal.tenant_id != principal.tenant_id:
            raise NotFound(f"no workflow {workflow_id!r} for this tenant", field="workflow_id")
        return workflow

    def list(self, principal: Principal, state: WorkflowState, page_size: int,
             page_token: str) -> tuple[list[Workflow], str]:
        if page_size < 0:
            raise InvalidInput("page_size must be >= 0", field="page_size")
        size = min(page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        try:
            offset = int(page_token) if page_token else 0
        except ValueError:
            offset = -1
        if offset < 0:
            raise InvalidInput("page_token is not one this service returned", field="page_token")
        found = self._store.page(principal.tenant_id, state, offset, size + 1)
        return found[:size], str(offset + size) if len(found) > size else ""

    async def cancel(self, principal: Principal, workflow_id: str) -> Workflow:
        workflow = self.get(principal, workflow_id)
        if workflow.state.finished:
            raise FailedPrecondition(f"workflow {workflow_id} already ended as {workflow.state.name}",
                                     field="workflow_id")
        await self._runner.cancel(workflow)
        return self.get(principal, workflow_id)

    async def watch(self, principal: Principal, workflow_id: str) -> AsyncIterator[tuple[NodeStatus, Workflow]]:
        """Every node as it is, then each node whose state, attempt or usage changed, until the workflow
        ends."""
        seen: dict[str, tuple[object, ...]] = {}
        workflow = self.get(principal, workflow_id)
        while True:
            for node in workflow.nodes:
                mark = (node.state, node.attempt, node.runs, node.usage)
                if seen.get(node.node_id) != mark:
                    seen[node.node_id] = mark
                    yield node, workflow
            if workflow.state.finished:
                return
            changed = self._runner.changes.current()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), WATCH_POLL_S)
            found = await self._store.aget(workflow_id)
            if found is None:
                return
            workflow = found
