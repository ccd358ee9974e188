"""Workflows and their nodes in the router store (SQLite or PostgreSQL, services/router/store): a node's
state, output and usage are committed in one transaction when it finishes, before the runner looks for
the nodes that depend on it, so a router that dies never loses a finished node.

What every attempt of a node delivered (a cancelled, failed or timed-out one too) is kept per usage event
as the router settled it with billing (`record_attempt`, keyed by the event id, so a re-run after a crash
is one row as it is one event in billing); a node's usage and cost are the sum of its attempts, so a
workflow's totals are what billing recorded under its `workflow` tag.

A node is WAITING, RUNNING (claimed by a runner: a conditional update, so two routers on one PostgreSQL
never both start it) or finished. A claim names its router (`owner`, kept in the router's data dir, so
it is the same after a restart) and holds until `lease_us`, which the runner extends while the node
runs. `recover` puts back to WAITING, with the same attempt, the nodes its own router was running when
it stopped and those whose claim expired (another router died): the re-run uses the same request id,
so billing (idempotent by event id) counts it once.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import asdict
from datetime import datetime
from pathlib import Path
from typing import Any

from services.common.generation import TrafficClass
from services.common.usage import Usage
from services.router.store import Row, Store, Tx
from services.router.store.migrations import WORKFLOWS
from services.router.store.values import dt, principal_from_json, principal_json, us
from services.router.tasks import LengthUnit, OutputFormat, TaskKind
from services.router.types import Message, Money, Principal, Role, Sampling
from services.router.workflows.model import (
    NewWorkflow,
    NodeSpec,
    NodeState,
    NodeStatus,
    RetryPolicy,
    Workflow,
    WorkflowState,
)

ACTIVE = (int(WorkflowState.QUEUED), int(WorkflowState.RUNNING), int(WorkflowState.PAUSED))


def spec_json(spec: NodeSpec) -> str:
    data = asdict(spec)
    data["messages"] = [[int(m.role), m.content] for m in spec.messages]
    return json.dumps(data)


def spec_of(text: str) -> NodeSpec:
    data: dict[str, Any] = json.loads(text)
    sampling = data.pop("sampling")
    sampling["stop"] = tuple(sampling["stop"])
    return NodeSpec(
        **{**data, "kind": TaskKind(data["kind"]), "length_unit": LengthUnit(data["length_unit"]),
           "output_format": OutputFormat(data["output_format"]), "labels": tuple(data["labels"]),
           "fields": tuple(data["fields"]), "depends_on": tuple(data["depends_on"]),
           "messages": tuple(Message(Role(r), c) for r, c in data["messages"]),
           "retry": RetryPolicy(**data["retry"])},
        sampling=Sampling(**sampling),
    )


class WorkflowStore:
    def __init__(self, store: Store) -> None:
        self._store = store
        self._store.migrate("workflows", WORKFLOWS)

    def create(self, workflow_id: str, principal: Principal, new: NewWorkflow, nodes: tuple[NodeSpec, ...],
               traffic_class: TrafficClass, max_concurrency: int, now: datetime) -> Workflow:
        def unit(tx: Tx) -> Workflow:
            tx.execute(
                "INSERT INTO workflows (workflow_id, tenant_id, principal, name, model, state, traffic_class,"
                " create_us, deadline_us, end_us, tags, max_concurrency) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, NULL, ?, ?)",
                (workflow_id, principal.tenant_id, principal_json(principal), new.name, new.model,
                 int(WorkflowState.QUEUED), int(traffic_class), us(now), us(new.deadline), json.dumps(new.tags),
                 max_concurrency))
            tx.executemany(
                "INSERT INTO workflow_nodes (workflow_id, node_id, position, spec, state) VALUES (?, ?, ?, ?, ?)",
                [(workflow_id, n.node_id, i, spec_json(n), int(NodeState.WAITING)) for i, n in enumerate(nodes)])
            created = _get(tx, workflow_id)
            assert created is not None
            return created

        return self._store.write(unit)

    def get(self, workflow_id: str) -> Workflow | None:
        return self._store.read(lambda tx: _get(tx, workflow_id))

    async def aget(self, workflow_id: str) -> Workflow | None:
        return await self._store.aread(lambda tx: _get(tx, workflow_id))

    def page(self, tenant_id: str, state: WorkflowState, offset: int, limit: int) -> list[Workflow]:
        query = "SELECT workflow_id FROM workflows WHERE tenant_id = ?"
        args: list[object] = [tenant_id]
        if state != WorkflowState.UNSPECIFIED:
            query += " AND state = ?"
            args.append(int(state))
        query += " ORDER BY create_us DESC, workflow_id DESC LIMIT ? OFFSET ?"
        return self._store.read(lambda tx: _many(tx, tx.all(query, (*args, limit, offset))))

    def active(self) -> list[Workflow]:
        """Unfinished workflows by traffic class (CORE first), then earliest deadline (none last), then
        oldest."""
        return self._store.read(lambda tx: _many(tx, tx.all(
            "SELECT workflow_id FROM workflows WHERE state IN (?, ?, ?)"
            " ORDER BY traffic_class, deadline_us IS NULL, deadline_us, create_us, workflow_id", ACTIVE)))

    def set_state(self, workflow_id: str, state: WorkflowState, end_time: datetime | None = None) -> bool:
        """Move an unfinished workflow to `state`; a finished one never changes again. True when it moved."""
        return self._store.write(lambda tx: tx.execute(
            "UPDATE workflows SET state = ?, end_us = ? WHERE workflow_id = ? AND state IN (?, ?, ?)",
            (int(state), us(end_time), workflow_id, *ACTIVE))) > 0

    def claim(self, workflow_id: str, node_id: str, now: datetime, owner: str = "",
              until: datetime | None = None) -> bool:
        """WAITING -> RUNNING for `owner` until `until`; False when another runner took it first or it is
        no longer waiting."""
        return self._store.write(lambda tx: tx.execute(
            "UPDATE workflow_nodes SET state = ?, runs = runs + 1, start_us = ?, end_us = NULL, owner = ?,"
            " lease_us = ? WHERE workflow_id = ? AND node_id = ? AND state = ?",
            (int(NodeState.RUNNING), us(now), owner, us(until), workflow_id, node_id, int(NodeState.WAITING)))) > 0

    def extend(self, owner: str, until: datetime) -> int:
        """Extend the claims of every node `owner` is running."""
        return self._store.write(lambda tx: tx.execute(
            "UPDATE workflow_nodes SET lease_us = ? WHERE owner = ? AND state = ?",
            (us(until), owner, int(NodeState.RUNNING))))

    def finish(self, workflow_id: str, node_id: str, state: NodeState, now: datetime, *, output: str = "",
               fields: dict[str, str] | None = None, usage: Usage | None = None, cost: Money | None = None,
               error_code: str = "", error_message: str = "") -> bool:
        """A running node's outcome, committed whole."""
        usage, cost = usage or Usage(), cost or Money()
        return self._store.write(lambda tx: tx.execute(
            "UPDATE workflow_nodes SET state = ?, end_us = ?, output = ?, fields = ?, prompt_tokens = ?,"
            " completion_tokens = ?, cost_micros = ?, currency = ?, error_code = ?, error_message = ?"
            " WHERE workflow_id = ? AND node_id = ? AND state = ?",
            (int(state), us(now), output, json.dumps(fields or {}), usage.prompt_tokens, usage.completion_tokens,
             cost.micros, cost.currency_code, error_code, error_message, workflow_id, node_id,
             int(NodeState.RUNNING)))) > 0

    async def record_attempt(self, tenant_id: str, workflow_id: str, node_id: str, event_id: str, usage: Usage,
                             cost: Money) -> bool:
        """What one attempt (usage event `event_id`) of a node of this tenant's workflow used and cost;
        a later call for the same event (billing's own price for it) replaces it. False when no such node."""
        return await self._store.awrite(lambda tx: tx.execute(
            "INSERT INTO workflow_attempts (workflow_id, node_id, event_id, prompt_tokens, completion_tokens,"
            " cost_micros, currency) SELECT w.workflow_id, n.node_id, ?, ?, ?, ?, ? FROM workflows w"
            " JOIN workflow_nodes n ON n.workflow_id = w.workflow_id"
            " WHERE w.workflow_id = ? AND w.tenant_id = ? AND n.node_id = ?"
            " ON CONFLICT (workflow_id, node_id, event_id) DO UPDATE SET prompt_tokens = excluded.prompt_tokens,"
            " completion_tokens = excluded.completion_tokens, cost_micros = excluded.cost_micros,"
            " currency = excluded.currency",
            (event_id, usage.prompt_tokens, usage.completion_tokens, cost.micros, cost.currency_code, workflow_id,
             tenant_id, node_id))) > 0

    def retry(self, workflow_id: str, node_id: str, not_before: datetime, error_code: str,
              error_message: str) -> bool:
        """A failed attempt with attempts left: WAITING again for the next attempt, not before `not_before`."""
        return self._store.write(lambda tx: tx.execute(
            "UPDATE workflow_nodes SET state = ?, attempt = attempt + 1, not_before_us = ?, error_code = ?,"
            " error_message = ? WHERE workflow_id = ? AND node_id = ? AND state = ?",
            (int(NodeState.WAITING), us(not_before), error_code, error_message, workflow_id, node_id,
             int(NodeState.RUNNING)))) > 0

    def requeue(self, workflow_id: str, node_id: str) -> None:
        """RUNNING -> WAITING with the same attempt (shutdown, or a refusal worth waiting out)."""
        self._store.write(lambda tx: tx.execute(
            "UPDATE workflow_nodes SET state = ? WHERE workflow_id = ? AND node_id = ? AND state = ?",
            (int(NodeState.WAITING), workflow_id, node_id, int(NodeState.RUNNING))))

    def close_waiting(self, workflow_id: str, node_ids: list[str], state: NodeState, error_code: str,
                      message: str, now: datetime) -> int:
        def unit(tx: Tx) -> int:
            changed = 0
            for node_id in node_ids:
                changed += tx.execute(
                    "UPDATE workflow_nodes SET state = ?, error_code = ?, error_message = ?, end_us = ?"
                    " WHERE workflow_id = ? AND node_id = ? AND state = ?",
                    (int(state), error_code, message, us(now), workflow_id, node_id, int(NodeState.WAITING)))
            return changed

        return self._store.write(unit)

    def purge_finished(self, ended_before: datetime) -> int:
        """Delete finished workflows that ended before `ended_before`, with their nodes; returns how many."""
        finished = (int(WorkflowState.SUCCEEDED), int(WorkflowState.FAILED), int(WorkflowState.CANCELLED))

        def unit(tx: Tx) -> int:
            ids = [(row["workflow_id"],) for row in tx.all(
                "SELECT workflow_id FROM workflows WHERE state IN (?, ?, ?) AND end_us IS NOT NULL AND end_us < ?",
                (*finished, us(ended_before)))]
            if ids:
                tx.executemany("DELETE FROM workflow_attempts WHERE workflow_id = ?", ids)
                tx.executemany("DELETE FROM workflow_nodes WHERE workflow_id = ?", ids)
                tx.executemany("DELETE FROM workflows WHERE workflow_id = ?", ids)
            return len(ids)

        return self._store.write(unit)

    def recover(self, now: datetime | None = None, owner: str | None = None) -> int:
        """Running nodes whose claim expired before `now`, and those of `owner` (a router that stopped and
        starts again), go back to WAITING; without `now`, every running node does."""
        if now is None:
            return self._store.write(lambda tx: tx.execute(
                "UPDATE workflow_nodes SET state = ? WHERE state = ?", (int(NodeState.WAITING), int(NodeState.RUNNING))))
        return self._store.write(lambda tx: tx.execute(
            "UPDATE workflow_nodes SET state = ? WHERE state = ? AND (lease_us IS NULL OR lease_us < ? OR owner = ?)",
            (int(NodeState.WAITING), int(NodeState.RUNNING), us(now), owner)))


def owner_id(data_dir: Path) -> str:
    """This router's name in node claims: kept in its data dir, so a restarted router knows its own."""
    path = data_dir / "workflow_owner"
    if not path.exists():
        path.write_text(f"router-{uuid.uuid4().hex[:16]}\n")
    return path.read_text().strip()


def _many(tx: Tx, rows: list[Row]) -> list[Workflow]:
    found = [_get(tx, row["workflow_id"]) for row in rows]
    return [w for w in found if w is not None]


def _get(tx: Tx, workflow_id: str) -> Workflow | None:
    row = tx.one("SELECT * FROM workflows WHERE workflow_id = ?", (workflow_id,))
    if row is None:
        return None
    attempts = {r["node_id"]: r for r in tx.all(
        "SELECT node_id, SUM(prompt_tokens) AS prompt_tokens, SUM(completion_tokens) AS completion_tokens,"
        " SUM(cost_micros) AS cost_micros, MAX(currency) AS currency FROM workflow_attempts WHERE workflow_id = ?"
        " GROUP BY node_id", (workflow_id,))}
    nodes = tuple(_node(n, attempts.get(n["node_id"])) for n in tx.all(
        "SELECT * FROM workflow_nodes WHERE workflow_id = ? ORDER BY position", (workflow_id,)))
    return Workflow(
        workflow_id=row["workflow_id"], principal=principal_from_json(row["principal"]), name=row["name"], model=row["model"],
        state=WorkflowState(row["state"]), traffic_class=TrafficClass(row["traffic_class"]),
        create_time=dt(row["create_us"]),  # type: ignore[arg-type]
        deadline=dt(row["deadline_us"]), end_time=dt(row["end_us"]), tags=json.loads(row["tags"]),
        max_concurrency=row["max_concurrency"], nodes=nodes,
    )


def _node(row: Row, attempts: Row | None) -> NodeStatus:
    """A node's row; its usage and cost are its attempts' sums (its own columns before any was recorded)."""
    used = row if attempts is None else attempts
    return NodeStatus(
        spec=spec_of(row["spec"]), state=NodeState(row["state"]), attempt=row["attempt"], runs=row["runs"],
        output=row["output"], fields=json.loads(row["fields"]),
        usage=Usage(int(used["prompt_tokens"]), int(used["completion_tokens"])),
        cost=Money(used["currency"] or "USD", int(used["cost_micros"])), error_code=row["error_code"],
        error_message=row["error_message"], start_time=dt(row["start_us"]), end_time=dt(row["end_us"]),
        not_before=dt(row["not_before_us"]),
    )
