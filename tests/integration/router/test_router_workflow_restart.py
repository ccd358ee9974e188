"""A router SIGKILLed while two workflow nodes run resumes the workflow at its next start (or, on a shared
PostgreSQL, another router does once the dead router's claims expired): the nodes that had finished are
not run again, the two that were running run again under the same request ids, and billing holds exactly
one usage event per node."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from autoglm.billing.v1 import billing_service_pb2 as billing_pb2
from autoglm.billing.v1 import billing_service_pb2_grpc as billing_grpc
from autoglm.common.v1 import money_pb2
from autoglm.router.v1 import admin_service_pb2 as admin_pb2
from autoglm.router.v1 import admin_service_pb2_grpc as admin_grpc
from autoglm.router.v1 import router_service_pb2 as pb2
from autoglm.router.v1 import router_service_pb2_grpc as router_grpc
from services.cli.endpoint import billing_token, operator_channel
from tests.integration.billing.conftest import PgServer, postgres  # noqa: F401 - the session's PostgreSQL
from tests.integration.router.conftest import ADMIN_TOKEN, MODEL
from tests.integration.router.service_process import drain, start_service, stop
from tests.integration.router.test_router_vertical import bearer
from tests.integration.router.test_router_workflows import finished, node, workflow_until
from tests.settlement import settled_usage


def start_router(tmp_path: Path, inference: str, billing: str, processes: list,  # type: ignore[type-arg]
                 name: str = "router", **settings: object) -> tuple:  # type: ignore[type-arg]
    config = tmp_path / f"{name}.yaml"
    config.write_text(json.dumps({"router": {"admin_token": ADMIN_TOKEN, "data_dir": str(tmp_path / name),
                                             "workflow_poll_s": 0.05, **settings}}))
    proc, address = start_service("router", ["--config", str(config), "--inference", inference,
                                             "--billing", billing], processes)
    drain(proc)
    return proc, address


async def kill_mid_workflow_and_finish(tmp_path: Path, restart: Callable[[str, str, list], tuple],  # type: ignore[type-arg]
                                       first_router: Callable[[str, str, list], tuple],  # type: ignore[type-arg]
                                       tenant: str, data_dirs: list[Path]) -> None:
    """Billing, a replica and a router; a workflow whose two middle nodes run when the router is SIGKILLed;
    `restart` brings up the router that finishes it. Checks what the module docstring says."""
    processes: list = []
    try:
        billing_proc, billing = start_service("billing", ["--data-dir", str(tmp_path / "billing")], processes)
        drain(billing_proc)
        inference_proc, inference = start_service("inference", ["--replica-id", "r1", "--threads", "1"], processes)
        drain(inference_proc)
        billing_channel = operator_channel(billing, billing_token(tmp_path / "billing"))
        billing_stub = billing_grpc.BillingServiceStub(billing_channel)
        await billing_stub.CreatePrice(billing_pb2.CreatePriceRequest(price=billing_pb2.Price(
            model=MODEL, input_per_million=money_pb2.Money(currency_code="USD", micros=1_000_000),
            output_per_million=money_pb2.Money(currency_code="USD", micros=2_000_000)), actor="test"), timeout=10)
        router_proc, router = first_router(inference, billing, processes)
        channel = grpc.aio.insecure_channel(router)
        key = await admin_grpc.AdminServiceStub(channel).CreateApiKey(
            admin_pb2.CreateApiKeyRequest(tenant_id=tenant), metadata=[("authorization", f"Bearer {ADMIN_TOKEN}")],
            timeout=10)
        secret = key.secret
        stub = router_grpc.RouterServiceStub(channel)
        submitted = (await stub.SubmitWorkflow(pb2.SubmitWorkflowRequest(model=MODEL, nodes=[
            node("first", "Name a colour."),
            node("left", "Tell a long story about a lighthouse. {{nodes.first.output}}", max_tokens=96),
            node("right", "Tell a long story about a river. {{nodes.first.output}}", max_tokens=96),
            node("last", "Join: {{nodes.left.output}} {{nodes.right.output}}", max_tokens=2),
        ]), metadata=bearer(secret), timeout=10)).workflow

        def both_running(w: pb2.Workflow) -> bool:
            states = {n.id: n.state for n in w.nodes}
            return states["left"] == states["right"] == pb2.NODE_STATE_RUNNING

        before = await workflow_until(stub, secret, submitted.workflow_id, both_running, "left and right to run")
        first = next(n for n in before.nodes if n.id == "first")
        assert first.state == pb2.NODE_STATE_SUCCEEDED and first.runs == 1
        router_proc.kill()
        router_proc.wait()
        await channel.close()

        _, router = restart(inference, billing, processes)
        async with grpc.aio.insecure_channel(router) as channel:
            done = await workflow_until(router_grpc.RouterServiceStub(channel), secret, submitted.workflow_id,
                                        finished, "to finish after the restart")
        assert done.state == pb2.WORKFLOW_STATE_SUCCEEDED
        nodes = {n.id: n for n in done.nodes}
        assert nodes["first"].runs == 1 and nodes["first"].output == first.output
        assert nodes["first"].end_time == first.end_time
        assert nodes["left"].runs == nodes["right"].runs == 2  # started again after the restart
        assert nodes["last"].runs == 1

        async def report() -> billing_pb2.GetUsageReportResponse:
            start, end = Timestamp(), Timestamp()
            start.FromDatetime(datetime.now(UTC) - timedelta(hours=1))
            end.FromDatetime(datetime.now(UTC) + timedelta(hours=1))
            return await billing_stub.GetUsageReport(billing_pb2.GetUsageReportRequest(
                start_time=start, end_time=end, tenant_id=tenant, group_by=[billing_pb2.REPORT_DIMENSION_TAG],
                tag_key="workflow_node"), timeout=10)

        rows = (await settled_usage(report, lambda r: r.total.requests, 4, "one event per node",
                                    routers=data_dirs)).rows
        assert {row.group["tag"]: row.requests for row in rows} == {"first": 1, "left": 1, "right": 1, "last": 1}
        for row in rows:
            assert row.cost.micros == nodes[row.group["tag"]].cost.micros > 0
        await billing_channel.close()
    finally:
        stop(processes)


async def test_a_router_killed_while_two_nodes_run_resumes_without_rerunning_finished_nodes(tmp_path: Path) -> None:
    def same_router(inference: str, billing: str, processes: list) -> tuple:  # type: ignore[type-arg]
        return start_router(tmp_path, inference, billing, processes)  # the same data dir each time

    await kill_mid_workflow_and_finish(tmp_path, same_router, same_router, "crashy", [tmp_path / "router"])


async def test_another_router_on_the_shared_database_finishes_the_workflow_of_a_router_that_died(
        postgres: PgServer, tmp_path: Path) -> None:  # noqa: F811
    dsn = postgres.create_database()
    shared = {"database": dsn, "key_pepper_path": str(tmp_path / "key_pepper"), "workflow_lease_s": 2.0}

    def router_a(inference: str, billing: str, processes: list) -> tuple:  # type: ignore[type-arg]
        return start_router(tmp_path, inference, billing, processes, "a", **shared)

    def router_b(inference: str, billing: str, processes: list) -> tuple:  # type: ignore[type-arg]
        return start_router(tmp_path, inference, billing, processes, "b", **shared)  # another data dir: another owner

    await kill_mid_workflow_and_finish(tmp_path, router_b, router_a, "orphaned", [tmp_path / "a", tmp_path / "b"])
