"""Workflows in the router store on both backends (SQLite file, real PostgreSQL): a node's outcome is kept
whole, a node's usage is the sum of its attempts as billed, a claim is taken once, a running node goes
back to WAITING at recovery with its attempt (its own router's at once, another router's once the claim
expired), and the active list is by class, then earliest deadline."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from services.common.generation import TrafficClass
from services.common.usage import Usage
from services.router.store import Store, open_store
from services.router.tasks import TaskKind
from services.router.types import Money, Principal, Sampling
from services.router.workflows.model import NewWorkflow, NodeSpec, NodeState, RetryPolicy, WorkflowState
from services.router.workflows.store import WorkflowStore
from tests.integration.billing.conftest import PgServer, postgres  # noqa: F401 - the session's PostgreSQL
from tests.integration.router.test_router_store import database, stores  # noqa: F401 - both backends

NOW = datetime(2026, 1, 1, tzinfo=UTC)
ACME = Principal("acme", "key-1", TrafficClass.INTERACTIVE, ("m",))


def new(deadline: datetime | None = None) -> tuple[NewWorkflow, tuple[NodeSpec, ...]]:
    nodes = (
        NodeSpec("a", prompt="one", sampling=Sampling(temperature=0.0, max_tokens=5, stop=("x",)),
                 retry=RetryPolicy(3, 0.5), timeout_s=2.0),
        NodeSpec("b", kind=TaskKind.EXTRACT, content="{{nodes.a.output}}", fields=("v",), depends_on=("a",)),
    )
    return NewWorkflow(nodes=nodes, name="n", model="m", deadline=deadline, tags={"team": "t"}), nodes


def test_nodes_and_their_outcomes_are_kept(database: str, stores: list[Store]) -> None:  # noqa: F811
    store = open_store(database)
    stores.append(store)
    workflows = WorkflowStore(store)
    spec, nodes = new(NOW + timedelta(hours=1))
    created = workflows.create("wf_1", ACME, spec, nodes, TrafficClass.INTERACTIVE, 2, NOW)
    assert created.state == WorkflowState.QUEUED and [n.spec for n in created.nodes] == list(nodes)
    assert created.principal == ACME and created.deadline == NOW + timedelta(hours=1) and created.tags == {"team": "t"}

    assert workflows.claim("wf_1", "a", NOW) and not workflows.claim("wf_1", "a", NOW)
    assert workflows.recover() == 1
    after = workflows.get("wf_1")
    assert after is not None and after.node("a").state == NodeState.WAITING and after.node("a").runs == 1
    assert workflows.claim("wf_1", "a", NOW)
    assert workflows.retry("wf_1", "a", NOW + timedelta(seconds=1), "UNAVAILABLE", "try again")
    retried = workflows.get("wf_1")
    assert retried is not None and retried.node("a").attempt == 2
    assert retried.node("a").not_before == NOW + timedelta(seconds=1)
    assert workflows.claim("wf_1", "a", NOW)
    assert workflows.finish("wf_1", "a", NodeState.SUCCEEDED, NOW, output="hello", fields={"k": "v"},
                            usage=Usage(3, 4), cost=Money("USD", 11))
    assert not workflows.finish("wf_1", "a", NodeState.FAILED, NOW)  # a finished node never changes again
    done = workflows.get("wf_1")
    assert done is not None
    a = done.node("a")
    assert (a.state, a.output, a.fields, a.usage, a.cost, a.runs) == (
        NodeState.SUCCEEDED, "hello", {"k": "v"}, Usage(3, 4), Money("USD", 11), 3)
    assert done.usage == Usage(3, 4) and done.cost == Money("USD", 11)
    assert workflows.close_waiting("wf_1", ["a", "b"], NodeState.CANCELLED, "CANCELLED", "stop", NOW) == 1
    assert workflows.set_state("wf_1", WorkflowState.CANCELLED, NOW)
    assert not workflows.set_state("wf_1", WorkflowState.RUNNING)
    assert [w.workflow_id for w in workflows.page("acme", WorkflowState.CANCELLED, 0, 10)] == ["wf_1"]
    assert workflows.page("other", WorkflowState.UNSPECIFIED, 0, 10) == []


def test_active_is_by_class_then_earliest_deadline(database: str, stores: list[Store]) -> None:  # noqa: F811
    store = open_store(database)
    stores.append(store)
    workflows = WorkflowStore(store)
    for wf_id, cls, deadline in [("late", TrafficClass.INTERACTIVE, NOW + timedelta(seconds=300)),
                                 ("none", TrafficClass.INTERACTIVE, None),
                                 ("soon", TrafficClass.INTERACTIVE, NOW + timedelta(seconds=30)),
                                 ("batch", TrafficClass.BATCH, NOW + timedelta(seconds=1)),
                                 ("core", TrafficClass.CORE, None)]:
        spec, nodes = new(deadline)
        workflows.create(wf_id, ACME, spec, nodes, cls, 1, NOW)
    assert [w.workflow_id for w in workflows.active()] == ["core", "soon", "late", "none", "batch"]


def test_a_claim_is_recovered_by_its_own_router_at_once_and_by_others_once_it_expired(
        database: str, stores: list[Store]) -> None:  # noqa: F811
    store = open_store(database)
    stores.append(store)
    workflows = WorkflowStore(store)
    spec, nodes = new()
    workflows.create("wf_1", ACME, spec, nodes, TrafficClass.INTERACTIVE, 2, NOW)
    assert workflows.claim("wf_1", "a", NOW, "router-1", NOW + timedelta(seconds=15))
    assert workflows.recover(NOW + timedelta(seconds=10), "router-2") == 0  # router-1 still holds it
    assert workflows.extend("router-1", NOW + timedelta(seconds=30)) == 1
    assert workflows.recover(NOW + timedelta(seconds=20)) == 0
    assert workflows.recover(NOW + timedelta(seconds=31)) == 1  # router-1 stopped extending it
    assert workflows.claim("wf_1", "a", NOW, "router-2", NOW + timedelta(seconds=60))
    assert workflows.recover(NOW) == 0
    assert workflows.recover(NOW, "router-2") == 1  # router-2 restarted: its own nodes come back at once
    found = workflows.get("wf_1")
    assert found is not None and found.node("a").state == NodeState.WAITING and found.node("a").attempt == 1


async def test_a_nodes_usage_is_the_sum_of_its_attempts_as_billed(database: str, stores: list[Store]) -> None:  # noqa: F811
    store = open_store(database)
    stores.append(store)
    workflows = WorkflowStore(store)
    spec, nodes = new()
    workflows.create("wf_2", ACME, spec, nodes, TrafficClass.INTERACTIVE, 2, NOW)
    assert workflows.claim("wf_2", "a", NOW)
    # attempt 1 fails after delivering 7 tokens (its usage event is all the runner never sees) ...
    assert await workflows.record_attempt("acme", "wf_2", "a", "wf_2.a.1", Usage(5, 7), Money("USD", 40))
    assert workflows.retry("wf_2", "a", NOW, "UNAVAILABLE", "replica lost")
    assert workflows.claim("wf_2", "a", NOW)
    # ... attempt 2 succeeds; billing's own price for it later replaces the router's estimate
    assert await workflows.record_attempt("acme", "wf_2", "a", "wf_2.a.2", Usage(5, 3), Money("USD", 20))
    assert workflows.finish("wf_2", "a", NodeState.SUCCEEDED, NOW, output="ok", usage=Usage(5, 3),
                            cost=Money("USD", 20))
    assert await workflows.record_attempt("acme", "wf_2", "a", "wf_2.a.2", Usage(5, 3), Money("USD", 21))
    # another tenant's event, or one naming no node of the workflow, counts nowhere
    assert not await workflows.record_attempt("other", "wf_2", "a", "x.1", Usage(1, 1), Money("USD", 1))
    assert not await workflows.record_attempt("acme", "wf_2", "zz", "x.2", Usage(1, 1), Money("USD", 1))
    done = workflows.get("wf_2")
    assert done is not None
    assert (done.node("a").usage, done.node("a").cost) == (Usage(10, 10), Money("USD", 61))
    assert (done.node("b").usage, done.node("b").cost) == (Usage(0, 0), Money("USD", 0))
    assert (done.usage, done.cost) == (Usage(10, 10), Money("USD", 61))
    assert workflows.set_state("wf_2", WorkflowState.SUCCEEDED, end_time=NOW)
    assert workflows.purge_finished(NOW + timedelta(seconds=1)) == 1
    assert store.read(lambda tx: tx.all("SELECT * FROM workflow_attempts")) == []
