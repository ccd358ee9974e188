"""Batch jobs on routers that share one PostgreSQL store, with real billing and the real model: a router
started while another runs a job never runs one of its items a second time, and a job whose router is
SIGKILLed mid-job is finished by the other router, each item with exactly one result and exactly one
usage event in billing's ledger. And the embedded default: one SQLite router, SIGKILLed and restarted,
re-runs its items at once."""

from __future__ import annotations

import json
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import psycopg
from google.protobuf.timestamp_pb2 import Timestamp
from prometheus_client import REGISTRY

from autoglm.billing.v1 import billing_service_pb2 as billing_pb2
from autoglm.billing.v1 import billing_service_pb2_grpc as billing_grpc
from autoglm.common.v1 import money_pb2
from autoglm.router.v1 import admin_service_pb2 as admin_pb2
from autoglm.router.v1 import admin_service_pb2_grpc as admin_grpc
from autoglm.router.v1 import router_service_pb2 as pb2
from autoglm.router.v1 import router_service_pb2_grpc as router_grpc
from services.billing.config import BillingConfig
from services.billing.server import build_server as build_billing
from services.cli.endpoint import billing_token, operator_channel
from services.inference.config import InferenceConfig
from services.inference.engine.model import LoadedModel
from services.inference.server import build_server as build_inference
from services.router.config import RouterConfig
from services.router.server import build_server as build_router
from tests.integration.billing.conftest import PgServer, postgres  # noqa: F401 - the session's PostgreSQL
from tests.integration.router.conftest import ADMIN_TOKEN, EPHEMERAL, MODEL
from tests.integration.router.service_process import drain, start_service, stop
from tests.integration.router.test_router_batch import finished, items, job_until
from tests.integration.router.test_router_vertical import bearer
from tests.settlement import settled_usage
from tests.waiting import wait_until

ADMIN = [("authorization", f"Bearer {ADMIN_TOKEN}")]
LEASE_S = 4.0  # short, so the takeover after a kill comes within the test's patience


async def create_price(billing_address: str, billing_dir: Path) -> None:
    async with operator_channel(billing_address, billing_token(billing_dir)) as channel:
        price = billing_pb2.Price(model=MODEL, input_per_million=money_pb2.Money(currency_code="USD", micros=1_000_000),
                                  output_per_million=money_pb2.Money(currency_code="USD", micros=2_000_000))
        await billing_grpc.BillingServiceStub(channel).CreatePrice(
            billing_pb2.CreatePriceRequest(price=price, actor="test"), timeout=10)


async def create_key(router: grpc.aio.Channel, tenant: str) -> str:
    reply = await admin_grpc.AdminServiceStub(router).CreateApiKey(
        admin_pb2.CreateApiKeyRequest(tenant_id=tenant, name="batch"), metadata=ADMIN, timeout=10)
    return reply.secret


def running_items(dsn: str, job_id: str) -> int:
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT COUNT(*) FROM router.items WHERE job_id = %s AND state = 1", (job_id,)).fetchone()
    return int(row[0]) if row else 0


def claimants(dsn: str, job_id: str) -> set[str]:
    """The routers holding running claims on the job's items."""
    with psycopg.connect(dsn) as conn:
        rows = conn.execute("SELECT DISTINCT claimed_by FROM router.items WHERE job_id = %s AND state = 1",
                            (job_id,)).fetchall()
    return {str(row[0]) for row in rows}


def claims(dsn: str, job_id: str) -> dict[int, int]:
    """How many times each item of the job was claimed."""
    with psycopg.connect(dsn) as conn:
        rows = conn.execute("SELECT idx, attempts FROM router.items WHERE job_id = %s", (job_id,)).fetchall()
    return {int(idx): int(n) for idx, n in rows}


def batch_requests_finished() -> float:
    """Batch generations every in-process router finished (any status), from the routers' own metric."""
    return sum(sample.value for metric in REGISTRY.collect() if metric.name == "autoglm_router_requests"
               for sample in metric.samples
               if sample.name == "autoglm_router_requests_total" and sample.labels.get("traffic_class") == "BATCH")


async def test_a_router_started_while_another_runs_a_job_never_runs_its_items_twice(
    serve, tmp_path: Path, loaded_model: LoadedModel, postgres: PgServer,  # noqa: F811
) -> None:
    dsn = postgres.create_database()
    billing = await serve(build_billing(BillingConfig(server=EPHEMERAL, data_dir=tmp_path / "billing")))
    inference = await serve(build_inference(InferenceConfig(server=EPHEMERAL, intra_op_threads=1), model=loaded_model))
    await create_price(billing.address, tmp_path / "billing")

    def router_config(name: str) -> RouterConfig:
        return RouterConfig(server=EPHEMERAL, inference_targets=(inference.address,), billing_target=billing.address,
                            data_dir=tmp_path / name, admin_token=ADMIN_TOKEN, database=dsn,
                            key_pepper_path=str(tmp_path / "key_pepper"), batch_concurrency=1, batch_poll_s=0.05)

    router_a = await serve(build_router(router_config("a")))
    before = batch_requests_finished()
    async with grpc.aio.insecure_channel(router_a.address) as channel_a:
        secret = await create_key(channel_a, "batchco")
        job = (await router_grpc.RouterServiceStub(channel_a).SubmitBatch(
            pb2.SubmitBatchRequest(model=MODEL, items=items(6, max_tokens=24)), metadata=bearer(secret),
            timeout=10)).job
        await wait_until(lambda: running_items(dsn, job.job_id) >= 1, 60, "router A to run an item")
        router_b = await serve(build_router(router_config("b")))  # starts while A's item runs
        async with grpc.aio.insecure_channel(router_b.address) as channel_b:
            done = await job_until(router_grpc.RouterServiceStub(channel_b), secret, job.job_id, finished,
                                   "to finish")
    assert done.state == pb2.JOB_STATE_SUCCEEDED and done.completed_items == 6
    assert sorted(r.custom_id for r in done.results) == [f"q{i}" for i in range(6)]
    assert claims(dsn, job.job_id) == dict.fromkeys(range(6), 1)  # each item claimed by one router, once
    assert batch_requests_finished() - before == 6  # and generated once: no item ran on both routers


def start_router(tmp_path: Path, name: str, dsn: str, inference: str, billing: str,
                 processes: list[subprocess.Popen[bytes]]) -> tuple[subprocess.Popen[bytes], str]:
    config = tmp_path / f"{name}.yaml"
    config.write_text(json.dumps({"router": {
        "admin_token": ADMIN_TOKEN, "data_dir": str(tmp_path / name), "database": dsn,
        "key_pepper_path": str(tmp_path / "key_pepper"), "batch_concurrency": 2, "batch_poll_s": 0.1,
        "batch_lease_s": LEASE_S}}))
    proc, address = start_service("router", ["--config", str(config), "--inference", inference,
                                             "--billing", billing], processes)
    drain(proc)
    return proc, address


def ledger(dsn: str, tenant: str) -> list[tuple[str, int, int]]:
    """Billing's ledger rows of the tenant: (event id, status, completion tokens)."""
    with psycopg.connect(dsn) as conn:
        rows = conn.execute("SELECT event_id, status, completion_tokens FROM events WHERE tenant_id = %s"
                            " ORDER BY event_id", (tenant,)).fetchall()
    return [(str(e), int(s), int(c)) for e, s, c in rows]


async def test_a_job_whose_router_is_killed_mid_job_is_finished_by_another_and_billed_once_per_item(
    postgres: PgServer, tmp_path: Path,  # noqa: F811
) -> None:
    router_dsn, billing_dsn = postgres.create_database(), postgres.create_database()
    processes: list[subprocess.Popen[bytes]] = []
    try:
        billing_proc, billing = start_service(
            "billing", ["--data-dir", str(tmp_path / "billing"), "--database", billing_dsn], processes)
        drain(billing_proc)
        inference_proc, inference = start_service("inference", ["--replica-id", "r1", "--threads", "1"], processes)
        drain(inference_proc)
        await create_price(billing, tmp_path / "billing")
        proc_a, a = start_router(tmp_path, "a", router_dsn, inference, billing, processes)
        _, b = start_router(tmp_path, "b", router_dsn, inference, billing, processes)
        async with grpc.aio.insecure_channel(a) as channel_a, grpc.aio.insecure_channel(b) as channel_b:
            secret = await create_key(channel_a, "batchco")
            stub_a, stub_b = router_grpc.RouterServiceStub(channel_a), router_grpc.RouterServiceStub(channel_b)
            job = (await stub_a.SubmitBatch(pb2.SubmitBatchRequest(model=MODEL, items=items(12, max_tokens=24)),
                                            metadata=bearer(secret), timeout=10)).job
            # Mid-job: both routers hold running claims when A dies.
            await wait_until(lambda: len(claimants(router_dsn, job.job_id)) == 2, 90, "both routers to run items")
            proc_a.kill()
            proc_a.wait(timeout=10)
            done = await job_until(stub_b, secret, job.job_id, finished, "router B to finish it")
        assert done.state == pb2.JOB_STATE_SUCCEEDED and done.completed_items == 12 and done.failed_items == 0
        assert sorted(r.custom_id for r in done.results) == sorted(f"q{i}" for i in range(12))
        assert all(r.text and r.usage.completion_tokens >= 1 for r in done.results)
        taken_over = [idx for idx, n in claims(router_dsn, job.job_id).items() if n == 2]
        assert taken_over and max(claims(router_dsn, job.job_id).values()) == 2  # A's items, claimed again by B

        rows = await settled_usage(lambda: _ledger(billing_dsn, "batchco"), len, 12, "one usage event per item",
                                   routers=[tmp_path / "b"])
        assert [event_id for event_id, _, _ in rows] == sorted(f"{job.job_id}-{i}" for i in range(12))
        assert sum(tokens for _, _, tokens in rows) == done.usage.completion_tokens
    finally:
        stop(processes)


async def _ledger(dsn: str, tenant: str) -> list[tuple[str, int, int]]:
    return ledger(dsn, tenant)


async def test_a_router_killed_mid_job_and_restarted_on_its_data_dir_reruns_its_items_at_once(
    tmp_path: Path,
) -> None:
    """The embedded default (one router, SQLite in its data dir): a restart after a crash does not wait
    for the dead instance's leases (an hour here) to run its items again."""
    processes: list[subprocess.Popen[bytes]] = []
    config = tmp_path / "router.yaml"
    config.write_text(json.dumps({"router": {
        "admin_token": ADMIN_TOKEN, "data_dir": str(tmp_path / "router"), "batch_concurrency": 1,
        "batch_poll_s": 0.1, "batch_lease_s": 3600}}))
    try:
        billing_proc, billing = start_service("billing", ["--data-dir", str(tmp_path / "billing")], processes)
        drain(billing_proc)
        inference_proc, inference = start_service("inference", ["--replica-id", "r1", "--threads", "1"], processes)
        drain(inference_proc)
        await create_price(billing, tmp_path / "billing")
        args = ["--config", str(config), "--inference", inference, "--billing", billing]
        first, address = start_service("router", args, processes)
        drain(first)
        async with grpc.aio.insecure_channel(address) as channel:
            secret = await create_key(channel, "batchco")
            stub = router_grpc.RouterServiceStub(channel)
            job = (await stub.SubmitBatch(pb2.SubmitBatchRequest(model=MODEL, items=items(4, max_tokens=24)),
                                          metadata=bearer(secret), timeout=10)).job
            await job_until(stub, secret, job.job_id, lambda j: j.completed_items >= 1, "1 item done")
        first.kill()
        first.wait(timeout=10)
        second, address = start_service("router", args, processes)
        drain(second)
        async with grpc.aio.insecure_channel(address) as channel:
            done = await job_until(router_grpc.RouterServiceStub(channel), secret, job.job_id, finished, "to finish")
        assert done.state == pb2.JOB_STATE_SUCCEEDED and done.completed_items == 4
        async with operator_channel(billing, billing_token(tmp_path / "billing")) as channel:
            report = await settled_usage(lambda: _report(channel, "batchco"), lambda r: r.total.requests, 4,
                                         "one usage event per item", routers=[tmp_path / "router"])
        assert report.total.requests == 4 and report.total.completion_tokens == done.usage.completion_tokens
    finally:
        stop(processes)


async def _report(channel: grpc.aio.Channel, tenant: str) -> billing_pb2.GetUsageReportResponse:
    start, end = Timestamp(), Timestamp()
    start.FromDatetime(datetime.now(UTC) - timedelta(hours=1))
    end.FromDatetime(datetime.now(UTC) + timedelta(hours=1))
    return await billing_grpc.BillingServiceStub(channel).GetUsageReport(
        billing_pb2.GetUsageReportRequest(start_time=start, end_time=end, tenant_id=tenant), timeout=10)
