"""The background scheduler of workflows.

Each tick looks at the unfinished workflows by traffic class (CORE, INTERACTIVE, BATCH), earliest
deadline first within a class (none last), then oldest, and for each
  - fails what is left of a workflow whose deadline has passed (DEADLINE_EXCEEDED);
  - marks UPSTREAM_FAILED the waiting nodes that depend on a failed or cancelled node (the others go on);
  - finishes a workflow whose nodes have all finished (SUCCEEDED when every node did, else FAILED);
  - pauses a BATCH workflow while billing says its tenant is CRITICAL or worse (and resumes it after);
  - starts its ready nodes (waiting, every dependency succeeded, past their retry backoff) while the
    workflow runs fewer than its cap and the router fewer than `concurrency` nodes.
A node runs through `execute` — the gateway's own path (rate limits, budget hold, one usage event) as
the submitting key — under the request id `<workflow>.<node>.<attempt>` with the tags `workflow` and
`workflow_node`, so a node re-run after a crash is still one usage event and billing reports group cost
per node. A failure is retried per the node's policy (backoff doubling), then fails the node; transient
refusals (budget, billing unreachable, rate limit, full queue) put it back to WAITING. Its outcome is
committed (`WorkflowStore.finish`) before the runner is woken to look for the nodes depending on it.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta

import structlog

from services.common.errors import BudgetExceeded, DomainError, QueueFull, RateLimited
from services.common.generation import TrafficClass
from services.common.usage import AlertLevel
from services.router.metering import BillingUnavailable
from services.router.types import Message, Principal, RequestContext, Summary
from services.router.workflows.model import NodeSpec, NodeState, NodeStatus, Workflow, WorkflowState
from services.router.workflows.store import WorkflowStore
from services.router.workflows.template import parsed_fields, render

log = structlog.get_logger(__name__)
TRANSIENT = (BudgetExceeded, BillingUnavailable, RateLimited, QueueFull)
BLOCKING = (NodeState.FAILED, NodeState.UPSTREAM_FAILED, NodeState.CANCELLED)


@dataclass(frozen=True)
class NodeCall:
    """One attempt of a node, its references rendered."""

    ctx: RequestContext
    model: str
    spec: NodeSpec
    traffic_class: TrafficClass


Execute = Callable[[NodeCall], Awaitable[tuple[str, Summary]]]
LevelOf = Callable[[Principal, dict[str, str]], Awaitable[AlertLevel]]


@dataclass(frozen=True)
class WorkflowSettings:
    concurrency: int = 8  # nodes running at once, router-wide
    default_max_concurrency: int = 4  # per workflow, when it sets none
    max_nodes: int = 64
    poll_s: float = 0.5
    shutdown_grace_s: float = 10.0
    # A node's claim holds this long past the runner's last extension (every lease_s / 3); a node whose
    # router died is run again by any router once its claim expired.
    lease_s: float = 15.0
    # Finished workflows are deleted this long after they ended (checked every purge_interval_s).
    retention_s: float = 7 * 86400.0
    purge_interval_s: float = 3600.0


@dataclass
class Changes:
    """Wakes whoever follows workflows (WatchWorkflow) after any node or workflow changed state."""

    _event: asyncio.Event = field(default_factory=asyncio.Event)

    def notify(self) -> None:
        self._event.set()
        self._event = asyncio.Event()

    def current(self) -> asyncio.Event:
        """Take it before reading the store; it is set by the next change after that."""
        return self._event


def node_tags(workflow: Workflow, node_id: str) -> dict[str, str]:
    return {**workflow.tags, "workflow": workflow.workflow_id, "workflow_node": node_id}


def rendered(node: NodeSpec, workflow: Workflow) -> NodeSpec:
    outputs = {n.node_id: n.output for n in workflow.nodes if n.state == NodeState.SUCCEEDED}
    fields = {n.node_id: n.fields for n in workflow.nodes if n.state == NodeState.SUCCEEDED}
    return replace(node, prompt=render(node.prompt, outputs, fields), content=render(node.content, outputs, fields),
                   messages=tuple(Message(m.role, render(m.content, outputs, fields)) for m in node.messages))


class WorkflowRunner:
    def __init__(
        self,
        store: WorkflowStore,
        execute: Execute,
        level_of: LevelOf,
        status_name: Callable[[DomainError], str],
        settings: WorkflowSettings | None = None,
        wallclock: Callable[[], datetime] = lambda: datetime.now(UTC),
        clock: Callable[[], float] = time.monotonic,
        owner: str = "",
    ) -> None:
        self._store = store
        self._owner = owner
        self._execute = execute
        self._level_of = level_of
        self._status_name = status_name
        self.settings = settings or WorkflowSettings()
        self._wallclock = wallclock
        self._clock = clock
        self._running: dict[tuple[str, str], asyncio.Task[None]] = {}
        self._stop_reason: dict[tuple[str, str], str] = {}
        self._wake = asyncio.Event()
        self._closing = False
        self.changes = Changes()

    def wake(self) -> None:
        self._wake.set()

    def _changed(self) -> None:
        self.changes.notify()

    def keep_claims(self) -> None:
        """Extend this router's claims, and take back for anyone the nodes whose claim expired."""
        now = self._wallclock()
        if self._running:
            self._store.extend(self._owner, now + timedelta(seconds=self.settings.lease_s))
        recovered = self._store.recover(now)  # another router's, after it stopped extending them
        if recovered:
            log.info("workflow_nodes_recovered", nodes=recovered)

    async def run_forever(self) -> None:
        recovered = self._store.recover(self._wallclock(), self._owner)  # what this router ran before it stopped
        if recovered:
            log.info("workflow_nodes_recovered", nodes=recovered)
        purged_at: float | None = None
        claims_at = self._clock()
        while not self._closing:
            self._wake.clear()
            try:
                if purged_at is None or self._clock() - purged_at >= self.settings.purge_interval_s:
                    purged_at = self._clock()
                    self.purge()
                if self._clock() - claims_at >= self.settings.lease_s / 3:
                    claims_at = self._clock()
                    self.keep_claims()
                await self.tick()
            except Exception:  # the worker must outlive one bad tick; the next one retries
                log.exception("workflow_tick_failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.settings.poll_s)

    def purge(self) -> int:
        purged = self._store.purge_finished(self._wallclock() - timedelta(seconds=self.settings.retention_s))
        if purged:
            log.info("workflows_purged", workflows=purged)
        return purged

    async def tick(self) -> None:
        levels: dict[str, AlertLevel | None] = {}
        active = self._store.active()
        await self._stop_ended({w.workflow_id for w in active})
        for workflow in active:
            now = self._wallclock()
            if workflow.deadline is not None and workflow.deadline <= now:
                await self._expire(workflow, now)
                continue
            if self._block_dependants(workflow, now):
                workflow = self._store.get(workflow.workflow_id) or workflow
            if all(n.state.finished for n in workflow.nodes):
                self._finalize(workflow, now)
                continue
            if workflow.traffic_class == TrafficClass.BATCH:
                tenant = workflow.principal.tenant_id
                if tenant not in levels:
                    levels[tenant] = await self._level(workflow)
                level = levels[tenant]
                if level is None:
                    continue  # billing cannot say: batch work waits for it
                if level >= AlertLevel.CRITICAL:
                    if workflow.state != WorkflowState.PAUSED and self._store.set_state(
                            workflow.workflow_id, WorkflowState.PAUSED):
                        log.info("workflow_paused", workflow_id=workflow.workflow_id, tenant=tenant, level=level.name)
                        self._changed()
                    continue
            self._start_ready(workflow, now)

    async def _stop_ended(self, active: set[str]) -> None:
        """Nodes this router runs for a workflow that ended elsewhere (cancelled through another router)."""
        for workflow_id in {key[0] for key in self._running} - active:
            await self._stop_nodes(workflow_id, "cancel")

    def _start_ready(self, workflow: Workflow, now: datetime) -> None:
        states = {n.node_id: n.state for n in workflow.nodes}
        cap = workflow.max_concurrency or self.settings.default_max_concurrency
        mine = sum(1 for n in workflow.nodes if n.state == NodeState.RUNNING)
        started = False
        for node in workflow.nodes:
            free = min(self.settings.concurrency - len(self._running), cap - mine)
            if free <= 0:
                break
            if node.state != NodeState.WAITING or (node.not_before is not None and node.not_before > now):
                continue
            if not all(states[d] == NodeState.SUCCEEDED for d in node.spec.depends_on):
                continue
            until = now + timedelta(seconds=self.settings.lease_s)
            if not self._store.claim(workflow.workflow_id, node.node_id, now, self._owner, until):
                continue
            mine += 1
            started = True
            key = (workflow.workflow_id, node.node_id)
            self._running[key] = asyncio.create_task(self._run(workflow, node))
        if started:
            if workflow.state != WorkflowState.RUNNING:
                if workflow.state == WorkflowState.PAUSED:
                    log.info("workflow_resumed", workflow_id=workflow.workflow_id)
                self._store.set_state(workflow.workflow_id, WorkflowState.RUNNING)
            self._changed()

    def _block_dependants(self, workflow: Workflow, now: datetime) -> bool:
        """Waiting nodes behind a failed or cancelled one will never run: UPSTREAM_FAILED (in order, so a
        chain is marked in one pass)."""
        states = {n.node_id: n.state for n in workflow.nodes}
        changed = False
        for node in workflow.nodes:
            if node.state != NodeState.WAITING:
                continue
            culprit = next((d for d in node.spec.depends_on if states[d] in BLOCKING), None)
            if culprit is None:
                continue
            states[node.node_id] = NodeState.UPSTREAM_FAILED
            message = f"not run: node {culprit!r} it depends on ended {states[culprit].name}"
            changed |= self._store.close_waiting(workflow.workflow_id, [node.node_id], NodeState.UPSTREAM_FAILED,
                                                 "FAILED_PRECONDITION", message, now) > 0
        if changed:
            self._changed()
        return changed

    def _finalize(self, workflow: Workflow, now: datetime) -> None:
        ok = all(n.state == NodeState.SUCCEEDED for n in workflow.nodes)
        state = WorkflowState.SUCCEEDED if ok else WorkflowState.FAILED
        if self._store.set_state(workflow.workflow_id, state, end_time=now):
            log.info("workflow_finished", workflow_id=workflow.workflow_id, state=state.name)
            self._changed()

    async def _level(self, workflow: Workflow) -> AlertLevel | None:
        try:
            return await self._level_of(workflow.principal, workflow.tags)
        except DomainError as exc:
            log.warning("workflow_budget_check_failed", workflow_id=workflow.workflow_id, reason=exc.reason)
            return None

    async def _expire(self, workflow: Workflow, now: datetime) -> None:
        await self._stop_nodes(workflow.workflow_id, "deadline")
        waiting = [n.node_id for n in workflow.nodes if not n.state.finished]
        self._store.close_waiting(workflow.workflow_id, waiting, NodeState.FAILED, "DEADLINE_EXCEEDED",
                                  "the workflow's deadline passed before this node ran", now)
        self._store.set_state(workflow.workflow_id, WorkflowState.FAILED, end_time=now)
        log.info("workflow_deadline_passed", workflow_id=workflow.workflow_id)
        self._changed()

    async def cancel(self, workflow: Workflow) -> None:
        """Stop the running nodes (billed for what they generated) and never start the waiting ones."""
        now = self._wallclock()
        ids = [n.node_id for n in workflow.nodes]
        self._store.close_waiting(workflow.workflow_id, ids, NodeState.CANCELLED, "CANCELLED",
                                  "the workflow was cancelled", now)
        await self._stop_nodes(workflow.workflow_id, "cancel")
        self._store.close_waiting(workflow.workflow_id, ids, NodeState.CANCELLED, "CANCELLED",
                                  "the workflow was cancelled", now)
        self._store.set_state(workflow.workflow_id, WorkflowState.CANCELLED, end_time=self._wallclock())
        self._changed()

    async def _stop_nodes(self, workflow_id: str, reason: str) -> None:
        tasks = []
        for key, task in list(self._running.items()):
            if key[0] == workflow_id:
                self._stop_reason[key] = reason
                task.cancel()
                tasks.append(task)
        await asyncio.gather(*tasks, return_exceptions=True)

    def _timeout(self, workflow: Workflow, node: NodeStatus) -> float | None:
        limits = [node.spec.timeout_s] if node.spec.timeout_s else []
        if workflow.deadline is not None:
            limits.append(max(0.0, (workflow.deadline - self._wallclock()).total_seconds()))
        return min(limits) if limits else None

    async def _run(self, workflow: Workflow, node: NodeStatus) -> None:
        key = (workflow.workflow_id, node.node_id)
        wf_id, node_id, attempt = workflow.workflow_id, node.node_id, node.attempt
        timeout = self._timeout(workflow, node)
        ctx = RequestContext(f"{wf_id}.{node_id}.{attempt}", uuid.uuid4().hex, workflow.principal,
                             node_tags(workflow, node_id),
                             deadline=None if timeout is None else self._clock() + timeout)
        spec = rendered(node.spec, workflow)
        call = NodeCall(ctx, node.spec.model or workflow.model, spec, workflow.traffic_class)
        try:
            text, summary = await asyncio.wait_for(self._execute(call), timeout)
        except asyncio.CancelledError:
            reason = self._stop_reason.pop(key, "shutdown")
            now = self._wallclock()
            if reason == "cancel":
                self._store.finish(wf_id, node_id, NodeState.CANCELLED, now, error_code="CANCELLED",
                                   error_message="the workflow was cancelled")
            elif reason == "deadline":
                self._store.finish(wf_id, node_id, NodeState.FAILED, now, error_code="DEADLINE_EXCEEDED",
                                   error_message="the workflow's deadline passed")
            else:
                self._store.requeue(wf_id, node_id)
        except TimeoutError:
            self._failed(workflow, node, "DEADLINE_EXCEEDED",
                         f"the attempt ran past its timeout of {timeout:.1f} s" if timeout is not None else "timeout")
        except TRANSIENT as exc:
            self._store.requeue(wf_id, node_id)
            log.info("workflow_node_waits", workflow_id=wf_id, node=node_id, reason=exc.reason)
        except DomainError as exc:
            self._failed(workflow, node, self._status_name(exc), exc.message)
        except Exception:
            log.exception("workflow_node_crashed", workflow_id=wf_id, node=node_id)
            self._failed(workflow, node, "INTERNAL", "internal error; the router logged the details")
        else:
            fields = parsed_fields(spec.kind, text, spec.fields, spec.labels)
            self._store.finish(wf_id, node_id, NodeState.SUCCEEDED, self._wallclock(), output=text, fields=fields,
                               usage=summary.usage, cost=summary.cost)
        finally:
            self._running.pop(key, None)
            self._changed()
            self._wake.set()

    def _failed(self, workflow: Workflow, node: NodeStatus, code: str, message: str) -> None:
        policy = node.spec.retry
        now = self._wallclock()
        if node.attempt < policy.max_attempts:
            backoff = policy.backoff_s * 2 ** (node.attempt - 1)
            self._store.retry(workflow.workflow_id, node.node_id, now + timedelta(seconds=backoff), code, message)
            log.info("workflow_node_retry", workflow_id=workflow.workflow_id, node=node.node_id,
                     attempt=node.attempt + 1, backoff_s=backoff, error=code)
        else:
            self._store.finish(workflow.workflow_id, node.node_id, NodeState.FAILED, now, error_code=code,
                               error_message=message)

    async def close(self) -> None:
        """Stop starting nodes; give running ones a grace period, then put the rest back to WAITING."""
        self._closing = True
        self._wake.set()
        tasks = list(self._running.values())
        if tasks:
            _, late = await asyncio.wait(tasks, timeout=self.settings.shutdown_grace_s)
            for task in late:
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)
