"""The workflow runner over a real SQLite store and a fake gateway call: request ids are per node attempt
(the same after a crash, so billing counts a replay once), retries wait out their backoff, a failure
stops only its dependants, and references are rendered from committed outputs."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from pathlib import Path

from services.common.errors import DomainError, InvalidInput, Unavailable
from services.common.generation import FinishReason, TrafficClass
from services.common.usage import AlertLevel, Usage
from services.router.store import open_store
from services.router.types import Money, Principal, Summary
from services.router.workflows.model import NewWorkflow, NodeSpec, NodeState, RetryPolicy, WorkflowState
from services.router.workflows.runner import NodeCall, WorkflowRunner, WorkflowSettings
from services.router.workflows.store import WorkflowStore
from services.router.workflows.validate import validate

ACME = Principal("acme", "key-1")


class Calls:
    """A gateway stand-in: answers each node with a canned text, or raises what it is told to."""

    def __init__(self, failures: dict[str, list[DomainError]] | None = None) -> None:
        self.seen: list[NodeCall] = []
        self.failures = failures or {}

    async def __call__(self, call: NodeCall) -> tuple[str, Summary]:
        self.seen.append(call)
        pending = self.failures.get(call.spec.node_id)
        if pending:
            raise pending.pop(0)
        text = f"<{call.spec.node_id}:{call.spec.prompt}>"
        return text, Summary(FinishReason.STOP, Usage(3, 2), Money("USD", 7), "m", "v1", "t", 1)


class Clock:
    def __init__(self) -> None:
        self.now = datetime(2026, 1, 1, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now


async def none_level(principal: Principal, tags: dict[str, str]) -> AlertLevel:
    return AlertLevel.NONE


def setup(tmp_path: Path, calls: Calls, clock: Clock) -> tuple[WorkflowStore, WorkflowRunner]:
    store = WorkflowStore(open_store(f"sqlite:///{tmp_path / 'wf.db'}"))
    runner = WorkflowRunner(store, calls, none_level, lambda e: type(e).__name__, WorkflowSettings(), wallclock=clock,
                            owner="here")
    return store, runner


def submit(store: WorkflowStore, clock: Clock, *nodes: NodeSpec) -> str:
    new = NewWorkflow(nodes=nodes, model="m", tags={"team": "t"})
    store.create("wf1", ACME, new, validate(new), TrafficClass.INTERACTIVE, 4, clock())
    return "wf1"


async def settle(runner: WorkflowRunner, ticks: int = 6) -> None:
    for _ in range(ticks):
        await runner.tick()
        running = list(runner._running.values())
        if running:
            await asyncio.gather(*running, return_exceptions=True)


async def test_request_ids_and_tags_name_the_node_attempt_and_outputs_flow_to_dependants(tmp_path: Path) -> None:
    calls, clock = Calls(), Clock()
    store, runner = setup(tmp_path, calls, clock)
    submit(store, clock, NodeSpec("a", prompt="x"), NodeSpec("b", prompt="got {{nodes.a.output}}"))
    await settle(runner)
    workflow = store.get("wf1")
    assert workflow is not None and workflow.state == WorkflowState.SUCCEEDED
    assert [c.ctx.request_id for c in calls.seen] == ["wf1.a.1", "wf1.b.1"]
    assert calls.seen[1].spec.prompt == "got <a:x>"
    assert calls.seen[0].ctx.tags == {"team": "t", "workflow": "wf1", "workflow_node": "a"}
    assert workflow.usage == Usage(6, 4) and workflow.cost == Money("USD", 14)


async def test_a_node_running_at_a_crash_runs_again_under_the_same_request_id(tmp_path: Path) -> None:
    calls, clock = Calls(), Clock()
    store, runner = setup(tmp_path, calls, clock)
    submit(store, clock, NodeSpec("a", prompt="x"), NodeSpec("b", prompt="y", depends_on=("a",)))
    assert store.claim("wf1", "a", clock())  # a router took it, then died
    assert store.recover() == 1
    await settle(runner)
    assert [c.ctx.request_id for c in calls.seen] == ["wf1.a.1", "wf1.b.1"]
    workflow = store.get("wf1")
    assert workflow is not None and workflow.node("a").runs == 2 and workflow.node("b").runs == 1


async def test_retries_wait_their_backoff_then_fail_only_the_dependants(tmp_path: Path) -> None:
    calls = Calls({"a": [Unavailable("busy"), Unavailable("busy")], "c": [InvalidInput("bad")]})
    clock = Clock()
    store, runner = setup(tmp_path, calls, clock)
    submit(store, clock, NodeSpec("a", prompt="x", retry=RetryPolicy(3, 2.0)),
           NodeSpec("b", prompt="{{nodes.a.output}}"), NodeSpec("c", prompt="z"),
           NodeSpec("d", prompt="{{nodes.c.output}}"), NodeSpec("e", prompt="{{nodes.d.output}}"))
    await settle(runner)
    a = store.get("wf1").node("a")  # type: ignore[union-attr]
    assert a.state == NodeState.WAITING and a.attempt == 2 and a.not_before == clock.now + timedelta(seconds=2)
    clock.now += timedelta(seconds=2)
    await settle(runner)
    a = store.get("wf1").node("a")  # type: ignore[union-attr]
    assert a.attempt == 3 and a.not_before == clock.now + timedelta(seconds=4)  # doubled
    clock.now += timedelta(seconds=4)
    await settle(runner)
    workflow = store.get("wf1")
    assert workflow is not None and workflow.state == WorkflowState.FAILED
    states = {n.node_id: n.state for n in workflow.nodes}
    assert states == {"a": NodeState.SUCCEEDED, "b": NodeState.SUCCEEDED, "c": NodeState.FAILED,
                      "d": NodeState.UPSTREAM_FAILED, "e": NodeState.UPSTREAM_FAILED}
    assert [c.ctx.request_id for c in calls.seen if c.spec.node_id == "a"] == ["wf1.a.1", "wf1.a.2", "wf1.a.3"]
    assert workflow.node("c").error_code == "InvalidInput"


class Forever:
    """A gateway call that never answers until cancelled (a generation still running)."""

    def __init__(self) -> None:
        self.started = asyncio.Event()
        self.cancelled = 0

    async def __call__(self, call: NodeCall) -> tuple[str, Summary]:
        self.started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        raise AssertionError("unreachable")


async def test_an_attempt_past_its_timeout_is_stopped_and_fails_the_node(tmp_path: Path) -> None:
    forever, clock = Forever(), Clock()
    store, runner = setup(tmp_path, forever, clock)  # type: ignore[arg-type]
    submit(store, clock, NodeSpec("a", prompt="x", timeout_s=0.01))
    await settle(runner)
    workflow = store.get("wf1")
    assert workflow is not None and workflow.state == WorkflowState.FAILED and forever.cancelled == 1
    assert workflow.node("a").error_code == "DEADLINE_EXCEEDED" and "timeout" in workflow.node("a").error_message


async def test_cancel_stops_running_nodes_and_skips_waiting_ones(tmp_path: Path) -> None:
    forever, clock = Forever(), Clock()
    store, runner = setup(tmp_path, forever, clock)  # type: ignore[arg-type]
    submit(store, clock, NodeSpec("a", prompt="x"), NodeSpec("b", prompt="{{nodes.a.output}}"))
    await runner.tick()
    await forever.started.wait()
    await runner.cancel(store.get("wf1"))  # type: ignore[arg-type]
    workflow = store.get("wf1")
    assert workflow is not None and workflow.state == WorkflowState.CANCELLED and forever.cancelled == 1
    assert [n.state for n in workflow.nodes] == [NodeState.CANCELLED, NodeState.CANCELLED]
    assert not runner._running


async def test_a_passed_deadline_fails_what_is_left_and_finished_workflows_are_purged(tmp_path: Path) -> None:
    calls, clock = Calls(), Clock()
    store, runner = setup(tmp_path, calls, clock)
    new = NewWorkflow(nodes=(NodeSpec("a", prompt="x"),), model="m", deadline=clock.now + timedelta(seconds=5))
    store.create("wf1", ACME, new, validate(new), TrafficClass.INTERACTIVE, 4, clock())
    clock.now += timedelta(seconds=6)
    await settle(runner)
    workflow = store.get("wf1")
    assert workflow is not None and workflow.state == WorkflowState.FAILED and not calls.seen
    assert workflow.node("a").error_code == "DEADLINE_EXCEEDED"
    assert runner.purge() == 0  # within retention
    clock.now += timedelta(seconds=runner.settings.retention_s + 1)
    assert runner.purge() == 1 and store.get("wf1") is None


async def test_a_workflow_cancelled_through_another_router_stops_this_routers_nodes(tmp_path: Path) -> None:
    forever, clock = Forever(), Clock()
    store, here = setup(tmp_path, forever, clock)  # type: ignore[arg-type]
    there = WorkflowRunner(store, Calls(), none_level, lambda e: type(e).__name__, wallclock=clock, owner="other")
    submit(store, clock, NodeSpec("a", prompt="x"))
    await here.tick()
    await forever.started.wait()
    await there.cancel(store.get("wf1"))  # type: ignore[arg-type]
    await here.tick()
    workflow = store.get("wf1")
    assert workflow is not None and workflow.state == WorkflowState.CANCELLED and forever.cancelled == 1
    assert workflow.node("a").state == NodeState.CANCELLED and not here._running


async def test_keeping_claims_extends_this_routers_and_takes_back_only_expired_ones(tmp_path: Path) -> None:
    forever, clock = Forever(), Clock()
    store, here = setup(tmp_path, forever, clock)  # type: ignore[arg-type]
    submit(store, clock, NodeSpec("a", prompt="x"), NodeSpec("b", prompt="y"))
    assert store.claim("wf1", "b", clock(), "dead-router", clock.now + timedelta(seconds=1))
    await here.tick()
    await forever.started.wait()
    clock.now += timedelta(seconds=here.settings.lease_s / 2)
    here.keep_claims()  # a is this router's own: extended, not taken back; b's claim expired
    workflow = store.get("wf1")
    assert workflow is not None
    assert (workflow.node("a").state, workflow.node("a").runs) == (NodeState.RUNNING, 1)
    assert (workflow.node("b").state, workflow.node("b").runs) == (NodeState.WAITING, 1)
    clock.now += timedelta(seconds=here.settings.lease_s * 0.9)
    here.keep_claims()
    assert store.get("wf1").node("a").state == NodeState.RUNNING  # type: ignore[union-attr]
    for task in list(here._running.values()):
        task.cancel()
    await asyncio.gather(*here._running.values(), return_exceptions=True)
