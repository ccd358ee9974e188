"""Workflows through the real router, billing and model: the example file runs from the CLI with its
independent nodes overlapping, each node billed once under its own tags; bad graphs are refused naming
the cycle or the reference; earlier deadlines start first; a cancel stops the running generation within a
step and bills what it delivered, and the workflow's totals show what billing recorded under its tag."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from grpc_status import rpc_status
from prometheus_client import REGISTRY

from autoglm.billing.v1 import billing_service_pb2 as billing_pb2
from autoglm.common.v1 import error_details_pb2, generation_pb2, money_pb2
from autoglm.router.v1 import router_service_pb2 as pb2
from autoglm.router.v1 import router_service_pb2_grpc as router_grpc
from services.cli.main import main as autoglm
from services.inference.engine.model import LoadedModel
from tests.integration.router.conftest import MODEL, Mesh, start_mesh
from tests.integration.router.test_router_vertical import bearer
from tests.settlement import settled_usage
from tests.waiting import wait_until

ROOT = Path(__file__).resolve().parents[3]
EXAMPLE = ROOT / "examples" / "workflows" / "compare.yaml"
WAIT_S = 180.0
FINISHED = (pb2.WORKFLOW_STATE_SUCCEEDED, pb2.WORKFLOW_STATE_FAILED, pb2.WORKFLOW_STATE_CANCELLED)


def node(node_id: str, prompt: str, max_tokens: int = 2, **fields: object) -> pb2.WorkflowNode:
    return pb2.WorkflowNode(id=node_id, prompt=prompt, sampling=generation_pb2.SamplingParams(
        temperature=0.0, max_tokens=max_tokens), **fields)  # type: ignore[arg-type]


def in_future(seconds: float) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(datetime.now(UTC) + timedelta(seconds=seconds))
    return stamp


async def workflow_until(stub: router_grpc.RouterServiceStub, secret: str, workflow_id: str, done, what: str
                         ) -> pb2.Workflow:  # type: ignore[no-untyped-def]
    async def reached() -> pb2.Workflow | None:
        found = (await stub.GetWorkflow(pb2.GetWorkflowRequest(workflow_id=workflow_id), metadata=bearer(secret),
                                        timeout=10)).workflow
        return found if done(found) else None

    return await wait_until(reached, WAIT_S, f"workflow {workflow_id}: {what}")


def finished(workflow: pb2.Workflow) -> bool:
    return workflow.state in FINISHED


async def per_node_usage(mesh: Mesh, tenant: str, expected: int, tag_key: str = "workflow_node"
                         ) -> dict[str, billing_pb2.UsageReportRow]:
    """Billing's report grouped by the `workflow_node` tag (or `tag_key`), once settlement is idle."""
    async def read() -> billing_pb2.GetUsageReportResponse:
        start, end = Timestamp(), Timestamp()
        start.FromDatetime(datetime.now(UTC) - timedelta(hours=1))
        end.FromDatetime(datetime.now(UTC) + timedelta(hours=1))
        return await mesh.billing_stub.GetUsageReport(billing_pb2.GetUsageReportRequest(
            start_time=start, end_time=end, tenant_id=tenant, group_by=[billing_pb2.REPORT_DIMENSION_TAG],
            tag_key=tag_key), timeout=10)

    report = await settled_usage(read, lambda r: r.total.requests, expected, f"{expected} node events",
                                 routers=[mesh.data_dir])
    return {row.group["tag"]: row for row in report.rows}


def engine(name: str) -> float:
    """An in-process inference engine figure (summed over replicas), e.g. `tokens_generated_total`."""
    wanted = f"autoglm_inference_{name}"
    return sum(s.value for metric in REGISTRY.collect() for s in metric.samples if s.name == wanted)


async def test_the_example_runs_from_the_cli_with_parallel_nodes_each_billed_once(
        mesh: Mesh, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    secret, _ = await mesh.create_key("wfco")
    connection = ["--router", mesh.router.address, "--plaintext", "--api-key", secret, "--data-dir", str(tmp_path)]
    rc = await asyncio.to_thread(autoglm, ["workflow", "run", str(EXAMPLE), *connection])
    out = capsys.readouterr().out
    assert rc == 0, out
    workflow_id = out.split("\nworkflow ", 1)[1].split(":", 1)[0]
    progress = [line for line in out.splitlines() if line.startswith("[")]
    assert any("3 running" in line for line in progress)  # the live view saw the three summaries at once
    assert "5 done, 0 running, 0 waiting" in progress[-1]

    stub = mesh.router_stub
    workflow = (await stub.GetWorkflow(pb2.GetWorkflowRequest(workflow_id=workflow_id), metadata=bearer(secret),
                                       timeout=10)).workflow
    assert workflow.state == pb2.WORKFLOW_STATE_SUCCEEDED
    nodes = {n.id: n for n in workflow.nodes}
    assert all(n.state == pb2.NODE_STATE_SUCCEEDED and n.runs == 1 and n.output for n in nodes.values())
    offers = [nodes[f"offer_{x}"] for x in "abc"]
    # Independent nodes overlap: each started before any of them finished.
    assert max(n.start_time.ToDatetime() for n in offers) < min(n.end_time.ToDatetime() for n in offers)
    assert nodes["compare"].start_time.ToDatetime() >= max(n.end_time.ToDatetime() for n in offers)
    assert set(nodes["compare"].depends_on) == {"offer_a", "offer_b", "offer_c"}
    assert nodes["verdict"].start_time.ToDatetime() >= nodes["compare"].end_time.ToDatetime()

    rows = await per_node_usage(mesh, "wfco", 5)
    assert {tag: row.requests for tag, row in rows.items()} == dict.fromkeys(nodes, 1)
    for node_id, row in rows.items():
        assert row.cost.micros == nodes[node_id].cost.micros > 0
        assert row.completion_tokens == nodes[node_id].usage.completion_tokens
    assert workflow.cost.micros == sum(row.cost.micros for row in rows.values())

    assert await asyncio.to_thread(autoglm, ["workflow", "show", workflow_id, *connection]) == 0
    shown = capsys.readouterr().out
    assert "flowchart TD" in shown and 'n0["offer_a<br/>SUMMARIZE · succeeded"]' in shown
    assert "## verdict: succeeded" in shown


async def test_a_cycle_and_an_unknown_reference_are_refused_naming_them(mesh: Mesh) -> None:
    secret, _ = await mesh.create_key("wfco")
    cases = {
        "cycle: ": pb2.SubmitWorkflowRequest(model=MODEL, nodes=[
            node("a", "x {{nodes.c.output}}"), node("b", "y", depends_on=["a"]), node("c", "z", depends_on=["b"])]),
        "node 'b' references {{nodes.ghost.output}}, but there is no node 'ghost'": pb2.SubmitWorkflowRequest(
            model=MODEL, nodes=[node("a", "x"), node("b", "see {{nodes.ghost.output}}")]),
    }
    for needle, request in cases.items():
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await mesh.router_stub.SubmitWorkflow(request, metadata=bearer(secret), timeout=10)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT and needle in refused.value.details()
    cycle = (await _refusal(mesh, secret, cases["cycle: "])).split("cycle: ")[1]
    assert set(cycle.split(" -> ")) == {"a", "b", "c"}
    with pytest.raises(grpc.aio.AioRpcError) as unknown_model:
        await mesh.router_stub.SubmitWorkflow(pb2.SubmitWorkflowRequest(model=MODEL, nodes=[
            node("a", "x"), node("b", "y", model="no-such-model")]), metadata=bearer(secret), timeout=10)
    assert unknown_model.value.code() == grpc.StatusCode.NOT_FOUND
    assert detail_of(unknown_model.value).field == "nodes[1].model"
    listed = await mesh.router_stub.ListWorkflows(pb2.ListWorkflowsRequest(), metadata=bearer(secret), timeout=10)
    assert not listed.workflows  # nothing refused was stored

    ok = (await mesh.router_stub.SubmitWorkflow(pb2.SubmitWorkflowRequest(model=MODEL, nodes=[node("a", "Hi.")]),
                                                metadata=bearer(secret), timeout=10)).workflow
    other, _ = await mesh.create_key("someone-else")
    for call in (mesh.router_stub.GetWorkflow(pb2.GetWorkflowRequest(workflow_id=ok.workflow_id),
                                              metadata=bearer(other), timeout=10),
                 mesh.router_stub.CancelWorkflow(pb2.CancelWorkflowRequest(workflow_id=ok.workflow_id),
                                                 metadata=bearer(other), timeout=10)):
        with pytest.raises(grpc.aio.AioRpcError) as hidden:
            await call
        assert hidden.value.code() == grpc.StatusCode.NOT_FOUND
    await workflow_until(mesh.router_stub, secret, ok.workflow_id, finished, "to finish")


def detail_of(error: grpc.aio.AioRpcError) -> error_details_pb2.ErrorDetail:
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None
    unpacked = error_details_pb2.ErrorDetail()
    assert any(d.Unpack(unpacked) for d in status.details if d.Is(error_details_pb2.ErrorDetail.DESCRIPTOR))
    return unpacked


async def _refusal(mesh: Mesh, secret: str, request: pb2.SubmitWorkflowRequest) -> str:
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await mesh.router_stub.SubmitWorkflow(request, metadata=bearer(secret), timeout=10)
    return str(refused.value.details())


async def test_the_earlier_deadline_starts_first(serve, tmp_path: Path, loaded_model: LoadedModel) -> None:
    mesh = await start_mesh(serve, tmp_path, loaded_model, workflow_concurrency=1, workflow_poll_s=0.05)
    secret, _ = await mesh.create_key("wfco")
    stub = mesh.router_stub
    blocker = (await stub.SubmitWorkflow(pb2.SubmitWorkflowRequest(
        model=MODEL, nodes=[node("hold", "Count slowly from one to fifty.", max_tokens=24)]),
        metadata=bearer(secret), timeout=10)).workflow
    await workflow_until(stub, secret, blocker.workflow_id,
                         lambda w: w.nodes[0].state == pb2.NODE_STATE_RUNNING, "its node to run")
    late = (await stub.SubmitWorkflow(pb2.SubmitWorkflowRequest(
        model=MODEL, name="late", deadline=in_future(300), nodes=[node("one", "Say one."), node("two", "Say two.")]),
        metadata=bearer(secret), timeout=10)).workflow
    soon = (await stub.SubmitWorkflow(pb2.SubmitWorkflowRequest(
        model=MODEL, name="soon", deadline=in_future(30), nodes=[node("one", "Say one."), node("two", "Say two.")]),
        metadata=bearer(secret), timeout=10)).workflow
    done_late = await workflow_until(stub, secret, late.workflow_id, finished, "to finish")
    done_soon = await workflow_until(stub, secret, soon.workflow_id, finished, "to finish")
    assert done_late.state == done_soon.state == pb2.WORKFLOW_STATE_SUCCEEDED
    late_first = min(n.start_time.ToDatetime() for n in done_late.nodes)
    # Both of the 30 s workflow's ready nodes ran (one at a time) before any of the 300 s workflow's.
    assert max(n.start_time.ToDatetime() for n in done_soon.nodes) < late_first
    await mesh.channel.close()
    await mesh.billing_channel.close()


async def test_cancel_stops_the_running_generation_and_bills_what_it_delivered(mesh: Mesh) -> None:
    secret, _ = await mesh.create_key("wfcancel")
    stub = mesh.router_stub
    before = {name: engine(name) for name in ("tokens_generated_total", "cancelled_total",
                                               "steps_after_cancel_total")}
    submitted = (await stub.SubmitWorkflow(pb2.SubmitWorkflowRequest(model=MODEL, nodes=[
        node("story", "Tell a long story about the sea.", max_tokens=400),
        node("after", "Shorten: {{nodes.story.output}}")]), metadata=bearer(secret), timeout=10)).workflow
    await wait_until(lambda: engine("tokens_generated_total") >= before["tokens_generated_total"] + 5, WAIT_S,
                     "the story node to generate 5 tokens")
    cancelled = (await stub.CancelWorkflow(pb2.CancelWorkflowRequest(workflow_id=submitted.workflow_id),
                                           metadata=bearer(secret), timeout=30)).workflow
    assert cancelled.state == pb2.WORKFLOW_STATE_CANCELLED
    assert [n.state for n in cancelled.nodes] == [pb2.NODE_STATE_CANCELLED, pb2.NODE_STATE_CANCELLED]
    await wait_until(lambda: engine("active_sequences") == 0
                     and engine("cancelled_total") == before["cancelled_total"] + 1, 30,
                     "the replica ends the cancelled sequence")
    generated = engine("tokens_generated_total") - before["tokens_generated_total"]
    assert engine("steps_after_cancel_total") - before["steps_after_cancel_total"] <= 1
    assert generated < 400
    rows = await per_node_usage(mesh, "wfcancel", 1)
    assert list(rows) == ["story"]
    # Billed: the tokens the router had received when it cancelled (the replica may have made a few more).
    assert 1 <= rows["story"].completion_tokens <= generated
    # The workflow's own totals (GetWorkflow, `autoglm workflow show`) are what billing recorded under its tag.
    billed = (await per_node_usage(mesh, "wfcancel", 1, tag_key="workflow"))[submitted.workflow_id]

    async def totals() -> pb2.Workflow | None:
        shown = (await stub.GetWorkflow(pb2.GetWorkflowRequest(workflow_id=submitted.workflow_id),
                                        metadata=bearer(secret), timeout=10)).workflow
        return shown if shown.usage.total_tokens == billed.prompt_tokens + billed.completion_tokens else None

    shown = await wait_until(totals, 30, "the cancelled attempt's usage in the workflow's totals")
    assert (shown.usage.prompt_tokens, shown.usage.completion_tokens, shown.cost.micros) == (
        billed.prompt_tokens, billed.completion_tokens, billed.cost.micros)
    story = next(n for n in shown.nodes if n.id == "story")
    assert (story.usage.completion_tokens, story.cost.micros) == (rows["story"].completion_tokens,
                                                                   rows["story"].cost.micros)
    with pytest.raises(grpc.aio.AioRpcError) as again:
        await stub.CancelWorkflow(pb2.CancelWorkflowRequest(workflow_id=submitted.workflow_id),
                                  metadata=bearer(secret), timeout=10)
    assert again.value.code() == grpc.StatusCode.FAILED_PRECONDITION


async def test_a_failing_node_is_retried_then_fails_its_dependants_while_the_others_finish(mesh: Mesh) -> None:
    secret, _ = await mesh.create_key("wfco")
    retry = pb2.RetryPolicy(max_attempts=2)
    retry.backoff.FromMilliseconds(50)
    submitted = (await mesh.router_stub.SubmitWorkflow(pb2.SubmitWorkflowRequest(model=MODEL, nodes=[
        node("too_long", "Say hi.", max_tokens=1_000_000, retry=retry),
        node("after", "Shorten: {{nodes.too_long.output}}"),
        node("after_after", "Again: {{nodes.after.output}}"),
        node("fine", "Say one."),
    ]), metadata=bearer(secret), timeout=10)).workflow
    done = await workflow_until(mesh.router_stub, secret, submitted.workflow_id, finished, "to finish")
    nodes = {n.id: n for n in done.nodes}
    assert done.state == pb2.WORKFLOW_STATE_FAILED
    failed = nodes["too_long"]
    assert failed.state == pb2.NODE_STATE_FAILED and failed.attempt == 2 and failed.runs == 2
    assert failed.error_code == "INVALID_ARGUMENT" and "context window" in failed.error_message
    for blocked in ("after", "after_after"):
        assert nodes[blocked].state == pb2.NODE_STATE_UPSTREAM_FAILED and nodes[blocked].runs == 0
    assert "'too_long'" in nodes["after"].error_message and "'after'" in nodes["after_after"].error_message
    assert nodes["fine"].state == pb2.NODE_STATE_SUCCEEDED and nodes["fine"].output


async def test_dry_run_estimates_the_worst_case_and_require_budget_refuses_what_the_budget_cannot_hold(
        serve, tmp_path: Path, loaded_model: LoadedModel) -> None:
    mesh = await start_mesh(serve, tmp_path, loaded_model, price_refresh_s=0.1)
    secret, _ = await mesh.create_key("planner")
    request = pb2.SubmitWorkflowRequest(model=MODEL, dry_run=True, nodes=[
        node("a", "Say one.", max_tokens=10), node("b", "Say two: {{nodes.a.output}}", max_tokens=20)])

    async def priced() -> pb2.WorkflowEstimate | None:
        reply = await mesh.router_stub.SubmitWorkflow(request, metadata=bearer(secret), timeout=10)
        return reply.estimate if reply.estimate.HasField("cost") else None

    worst = await wait_until(priced, 30, "the router to know the model's price")
    assert worst.completion_tokens == 30
    # b's prompt may hold all of a's answer: its bound counts a's max_tokens.
    assert worst.prompt_tokens >= len("Say one.") + len("Say two: ") + 10
    assert worst.cost.micros == worst.prompt_tokens * 1 + worst.completion_tokens * 2  # 1 and 2 USD per million
    listed = await mesh.router_stub.ListWorkflows(pb2.ListWorkflowsRequest(), metadata=bearer(secret), timeout=10)
    assert not listed.workflows  # a dry run stores nothing

    await mesh.billing_stub.CreateBudget(billing_pb2.CreateBudgetRequest(budget=billing_pb2.Budget(
        scope=billing_pb2.BudgetScope(kind=billing_pb2.SCOPE_KIND_TENANT, tenant_id="planner"),
        period=billing_pb2.BudgetPeriod(kind=billing_pb2.PERIOD_KIND_DAILY),
        amount=money_pb2.Money(currency_code="USD", micros=worst.cost.micros - 1),
        enforcement=billing_pb2.ENFORCEMENT_HARD), actor="test"), timeout=10)
    request.require_budget = True
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await mesh.router_stub.SubmitWorkflow(request, metadata=bearer(secret), timeout=10)
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    request.require_budget = False
    assert (await mesh.router_stub.SubmitWorkflow(request, metadata=bearer(secret), timeout=10)).estimate.cost.micros
    await mesh.channel.close()
    await mesh.billing_channel.close()


async def test_a_batch_workflow_pauses_at_a_critical_budget_and_resumes_when_it_is_raised(
        serve, tmp_path: Path, loaded_model: LoadedModel) -> None:
    mesh = await start_mesh(serve, tmp_path, loaded_model, workflow_poll_s=0.05)
    secret, _ = await mesh.create_key("thrifty")
    budget = (await mesh.billing_stub.CreateBudget(billing_pb2.CreateBudgetRequest(budget=billing_pb2.Budget(
        scope=billing_pb2.BudgetScope(kind=billing_pb2.SCOPE_KIND_TENANT, tenant_id="thrifty"),
        period=billing_pb2.BudgetPeriod(kind=billing_pb2.PERIOD_KIND_DAILY),
        amount=money_pb2.Money(currency_code="USD", micros=1), enforcement=billing_pb2.ENFORCEMENT_SOFT,
    ), actor="test"), timeout=10)).budget
    submitted = (await mesh.router_stub.SubmitWorkflow(pb2.SubmitWorkflowRequest(
        model=MODEL, traffic_class=generation_pb2.TRAFFIC_CLASS_BATCH, nodes=[
            node("a", "Say one."), node("b", "Say two.", depends_on=["a"]), node("c", "Say three.", depends_on=["b"])]),
        metadata=bearer(secret), timeout=10)).workflow
    paused = await workflow_until(mesh.router_stub, secret, submitted.workflow_id,
                                  lambda w: w.state == pb2.WORKFLOW_STATE_PAUSED, "to pause")
    done_before = [n.id for n in paused.nodes if n.state == pb2.NODE_STATE_SUCCEEDED]
    assert 1 <= len(done_before) < 3  # the first node crossed 100 %, the rest wait
    assert paused.nodes[2].state == pb2.NODE_STATE_WAITING

    budget.amount.micros = 100_000_000
    await mesh.billing_stub.UpdateBudget(billing_pb2.UpdateBudgetRequest(budget=budget, actor="test"), timeout=10)
    done = await workflow_until(mesh.router_stub, secret, submitted.workflow_id, finished, "to finish")
    assert done.state == pb2.WORKFLOW_STATE_SUCCEEDED
    rows = await per_node_usage(mesh, "thrifty", 3)
    assert {tag: row.requests for tag, row in rows.items()} == {"a": 1, "b": 1, "c": 1}
    await mesh.channel.close()
    await mesh.billing_channel.close()
