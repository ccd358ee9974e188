"""Batch jobs through the real router, billing and model: durable, idempotent, billed once per item,
paused while the tenant's budget is CRITICAL, resumed when it is raised, cancellable, and resumed after a
router restart."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from autoglm.billing.v1 import billing_service_pb2 as billing_pb2
from autoglm.common.v1 import generation_pb2, money_pb2
from autoglm.router.v1 import router_service_pb2 as pb2
from autoglm.router.v1 import router_service_pb2_grpc as router_grpc
from services.inference.engine.model import LoadedModel
from services.router.config import RouterConfig
from services.router.server import build_server as build_router
from tests.integration.router.conftest import ADMIN_TOKEN, EPHEMERAL, MODEL, Mesh, start_mesh
from tests.integration.router.test_router_vertical import bearer, settled_rows
from tests.waiting import wait_until

WAIT_S = 90.0


def items(n: int, max_tokens: int = 2) -> list[pb2.BatchItem]:
    sampling = generation_pb2.SamplingParams(temperature=0.0, max_tokens=max_tokens)
    return [pb2.BatchItem(custom_id=f"q{i}", prompt=f"Say the number {i}.", sampling=sampling) for i in range(n)]


def in_future(seconds: float) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(datetime.now(UTC) + timedelta(seconds=seconds))
    return stamp


async def job_until(stub: router_grpc.RouterServiceStub, secret: str, job_id: str,
                    done: Callable[[pb2.Job], bool], what: str) -> pb2.Job:
    """Poll GetJob until `done` holds (the runner works in the background); fails naming `what` after WAIT_S."""
    async def reached() -> pb2.Job | None:
        job = (await stub.GetJob(pb2.GetJobRequest(job_id=job_id), metadata=bearer(secret), timeout=10)).job
        return job if done(job) else None

    return await wait_until(reached, WAIT_S, f"job {job_id}: {what}")


def finished(job: pb2.Job) -> bool:
    return job.state in (pb2.JOB_STATE_SUCCEEDED, pb2.JOB_STATE_FAILED, pb2.JOB_STATE_CANCELLED)


@pytest.fixture
async def slow_mesh(serve, tmp_path: Path, loaded_model: LoadedModel) -> Mesh:
    """One batch item at a time, and a runner that looks at jobs and budgets often."""
    return await start_mesh(serve, tmp_path, loaded_model, batch_concurrency=1, batch_poll_s=0.05)


async def test_batch_job_runs_every_item_once_billed_and_is_idempotent(mesh: Mesh) -> None:
    secret, _ = await mesh.create_key("batchco")
    request = pb2.SubmitBatchRequest(model=MODEL, items=items(4), deadline=in_future(600), tags={"team": "etl"},
                                     idempotency_key="nightly-1")
    first = (await mesh.router_stub.SubmitBatch(request, metadata=bearer(secret), timeout=10)).job
    again = (await mesh.router_stub.SubmitBatch(request, metadata=bearer(secret), timeout=10)).job
    assert again.job_id == first.job_id and first.total_items == 4
    assert first.state in (pb2.JOB_STATE_QUEUED, pb2.JOB_STATE_RUNNING)

    job = await job_until(mesh.router_stub, secret, first.job_id, finished, "to finish")
    assert job.state == pb2.JOB_STATE_SUCCEEDED and job.completed_items == 4 and job.failed_items == 0
    assert [r.custom_id for r in job.results] == ["q0", "q1", "q2", "q3"]
    assert all(r.text and r.usage.completion_tokens >= 1 and not r.error_code for r in job.results)
    assert job.usage.completion_tokens == sum(r.usage.completion_tokens for r in job.results)
    assert job.end_time.seconds > 0 and job.tags["team"] == "etl"

    report = await settled_rows(mesh, "batchco", 4)
    assert report.total.requests == 4
    assert report.total.completion_tokens == job.usage.completion_tokens
    assert job.cost.micros == report.total.cost.micros > 0

    listed = await mesh.router_stub.ListJobs(pb2.ListJobsRequest(state=pb2.JOB_STATE_SUCCEEDED),
                                             metadata=bearer(secret), timeout=10)
    assert [j.job_id for j in listed.jobs] == [job.job_id] and not listed.jobs[0].results

    other, _ = await mesh.create_key("someone-else")
    with pytest.raises(grpc.aio.AioRpcError) as hidden:
        await mesh.router_stub.GetJob(pb2.GetJobRequest(job_id=job.job_id), metadata=bearer(other), timeout=10)
    assert hidden.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.aio.AioRpcError) as ended:
        await mesh.router_stub.CancelJob(pb2.CancelJobRequest(job_id=job.job_id), metadata=bearer(secret), timeout=10)
    assert ended.value.code() == grpc.StatusCode.FAILED_PRECONDITION


async def test_invalid_batches_are_refused_with_the_field_named(mesh: Mesh) -> None:
    secret, _ = await mesh.create_key("batchco")
    cases = {
        "1 to 10000 items": pb2.SubmitBatchRequest(model=MODEL),
        "used twice": pb2.SubmitBatchRequest(model=MODEL, items=[items(1)[0], items(1)[0]]),
        "deadline is in the past": pb2.SubmitBatchRequest(model=MODEL, items=items(1), deadline=in_future(-60)),
        "exactly one of prompt and messages": pb2.SubmitBatchRequest(model=MODEL, items=[pb2.BatchItem(custom_id="x")]),
    }
    for needle, request in cases.items():
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await mesh.router_stub.SubmitBatch(request, metadata=bearer(secret), timeout=10)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT and needle in refused.value.details()


async def test_job_pauses_when_the_budget_is_critical_and_resumes_when_it_is_raised(slow_mesh: Mesh) -> None:
    mesh = slow_mesh
    secret, _ = await mesh.create_key("thrifty")
    budget = (await mesh.billing_stub.CreateBudget(billing_pb2.CreateBudgetRequest(budget=billing_pb2.Budget(
        scope=billing_pb2.BudgetScope(kind=billing_pb2.SCOPE_KIND_TENANT, tenant_id="thrifty"),
        period=billing_pb2.BudgetPeriod(kind=billing_pb2.PERIOD_KIND_DAILY),
        amount=money_pb2.Money(currency_code="USD", micros=1), enforcement=billing_pb2.ENFORCEMENT_SOFT,
    ), actor="test"), timeout=10)).budget
    job = (await mesh.router_stub.SubmitBatch(pb2.SubmitBatchRequest(model=MODEL, items=items(4)),
                                              metadata=bearer(secret), timeout=10)).job

    paused = await job_until(mesh.router_stub, secret, job.job_id, lambda j: j.state == pb2.JOB_STATE_PAUSED,
                             "to pause")
    assert paused.state == pb2.JOB_STATE_PAUSED
    assert 1 <= paused.completed_items < 4  # the first item crossed 100 %, the rest wait
    spent = await settled_rows(mesh, "thrifty", paused.completed_items)
    assert spent.total.requests == paused.completed_items

    budget.amount.micros = 100_000_000
    await mesh.billing_stub.UpdateBudget(billing_pb2.UpdateBudgetRequest(budget=budget, actor="test"), timeout=10)
    done = await job_until(mesh.router_stub, secret, job.job_id, finished, "to finish")
    assert done.state == pb2.JOB_STATE_SUCCEEDED and done.completed_items == 4
    report = await settled_rows(mesh, "thrifty", 4)
    assert report.total.requests == 4


async def test_cancel_stops_pending_items_and_keeps_finished_ones(slow_mesh: Mesh) -> None:
    mesh = slow_mesh
    secret, _ = await mesh.create_key("batchco")
    job = (await mesh.router_stub.SubmitBatch(pb2.SubmitBatchRequest(model=MODEL, items=items(30)),
                                              metadata=bearer(secret), timeout=10)).job
    await job_until(mesh.router_stub, secret, job.job_id, lambda j: j.completed_items >= 2, "2 items done")
    cancelled = (await mesh.router_stub.CancelJob(pb2.CancelJobRequest(job_id=job.job_id), metadata=bearer(secret),
                                                  timeout=30)).job
    assert cancelled.state == pb2.JOB_STATE_CANCELLED and cancelled.end_time.seconds > 0
    kept = [r for r in cancelled.results if not r.error_code]
    stopped = [r for r in cancelled.results if r.error_code == "CANCELLED"]
    assert len(kept) == cancelled.completed_items >= 2 and all(r.text for r in kept)
    assert len(kept) + len(stopped) == 30
    report = await settled_rows(mesh, "batchco", len(kept))
    by_status = {row.group["status"]: row.requests for row in report.rows}
    assert by_status.get("completed", by_status.get("COMPLETED", 0)) == len(kept)
    assert report.total.requests <= len(kept) + 1  # at most the one item in flight, billed as cancelled
    later = (await mesh.router_stub.GetJob(pb2.GetJobRequest(job_id=job.job_id), metadata=bearer(secret))).job
    assert later.state == pb2.JOB_STATE_CANCELLED and later.completed_items == cancelled.completed_items


async def test_deadline_passed_fails_the_remaining_items(slow_mesh: Mesh) -> None:
    mesh = slow_mesh
    secret, _ = await mesh.create_key("batchco")
    job = (await mesh.router_stub.SubmitBatch(
        pb2.SubmitBatchRequest(model=MODEL, items=items(200, max_tokens=4), deadline=in_future(1.5)),
        metadata=bearer(secret), timeout=10)).job
    done = await job_until(mesh.router_stub, secret, job.job_id, finished, "to finish")
    assert done.state == pb2.JOB_STATE_FAILED
    expired = [r for r in done.results if r.error_code == "DEADLINE_EXCEEDED"]
    assert expired and done.failed_items == len(expired)
    assert done.completed_items + len(expired) == 200


async def test_a_running_job_resumes_after_a_router_restart(serve, tmp_path: Path, loaded_model: LoadedModel) -> None:
    mesh = await start_mesh(serve, tmp_path, loaded_model, batch_concurrency=1, batch_poll_s=0.05)
    secret, _ = await mesh.create_key("batchco")
    job = (await mesh.router_stub.SubmitBatch(pb2.SubmitBatchRequest(model=MODEL, items=items(6)),
                                              metadata=bearer(secret), timeout=10)).job
    running = await job_until(mesh.router_stub, secret, job.job_id, lambda j: j.completed_items >= 1, "1 item done")
    assert running.state == pb2.JOB_STATE_RUNNING and running.completed_items < 6
    await mesh.channel.close()
    await mesh.router.stop(grace=0)

    router = await serve(build_router(RouterConfig(
        server=EPHEMERAL, inference_targets=(mesh.inference.address,), billing_target=mesh.billing.address,
        data_dir=mesh.data_dir, admin_token=ADMIN_TOKEN, batch_concurrency=1, batch_poll_s=0.05)))
    async with grpc.aio.insecure_channel(router.address) as channel:
        stub = router_grpc.RouterServiceStub(channel)
        done = await job_until(stub, secret, job.job_id, finished, "to finish")
    assert done.state == pb2.JOB_STATE_SUCCEEDED and done.completed_items == 6
    report = await settled_rows(mesh, "batchco", 6)
    assert report.total.requests == 6
    await mesh.billing_channel.close()
