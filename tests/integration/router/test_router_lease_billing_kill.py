"""The outage drill with real processes and `billing_leases` on: billing SIGKILLed under load (requests
within the lease are served, their usage resent over a new StreamUsage stream once billing is back on
its port), then frozen with SIGSTOP (calls time out instead of failing fast): requests within the lease
are served, and once the hard budget's lease is spent its requests are refused with UNAVAILABLE naming
the budget. After billing returns the ledger holds exactly the requests served, none missing or doubled."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
from pathlib import Path

import grpc

from autoglm.billing.v1 import billing_service_pb2 as billing_pb2
from autoglm.billing.v1 import billing_service_pb2_grpc as billing_grpc
from autoglm.common.v1 import money_pb2
from autoglm.router.v1 import admin_service_pb2 as admin_pb2
from autoglm.router.v1 import admin_service_pb2_grpc as admin_grpc
from autoglm.router.v1 import router_service_pb2 as pb2
from autoglm.router.v1 import router_service_pb2_grpc as router_grpc
from services.cli.endpoint import billing_token, operator_channel
from services.common.ports import free_port
from tests.integration.router.conftest import ADMIN_TOKEN, MODEL
from tests.integration.router.service_process import drain, start_service, stop
from tests.integration.router.test_router_crash_after_answer import BillingOnly
from tests.integration.router.test_router_leases import REQUEST
from tests.integration.router.test_router_vertical import bearer, settled_rows
from tests.waiting import wait_until


def holds(tmp_path: Path) -> int:
    with sqlite3.connect(tmp_path / "billing" / "billing.sqlite3", timeout=10) as conn:
        return int(conn.execute("SELECT COUNT(*) FROM holds").fetchone()[0])


async def test_billing_killed_then_frozen_serves_within_leases_refuses_precisely_and_bills_exactly(
        tmp_path: Path) -> None:
    processes: list = []
    port = free_port()
    billing_args = ["--data-dir", str(tmp_path / "billing"), "--port", str(port)]  # the last --port wins
    billing_proc = None
    try:
        billing_proc, billing = start_service("billing", billing_args, processes)
        drain(billing_proc)
        inference_proc, inference = start_service("inference", ["--replica-id", "r1", "--threads", "1"], processes)
        drain(inference_proc)
        operator = operator_channel(billing, billing_token(tmp_path / "billing"))
        stub = billing_grpc.BillingServiceStub(operator)
        await stub.CreatePrice(billing_pb2.CreatePriceRequest(price=billing_pb2.Price(
            model=MODEL, input_per_million=money_pb2.Money(currency_code="USD", micros=1_000_000),
            output_per_million=money_pb2.Money(currency_code="USD", micros=2_000_000)), actor="test"), timeout=10)
        created = await stub.CreateBudget(billing_pb2.CreateBudgetRequest(budget=billing_pb2.Budget(
            scope=billing_pb2.BudgetScope(kind=billing_pb2.SCOPE_KIND_TENANT, tenant_id="drill"),
            period=billing_pb2.BudgetPeriod(kind=billing_pb2.PERIOD_KIND_DAILY),
            amount=money_pb2.Money(currency_code="USD", micros=41 * 500),  # its leases cover ~5 to 50 requests
            enforcement=billing_pb2.ENFORCEMENT_HARD), actor="test"), timeout=10)
        config = tmp_path / "mesh.yaml"
        config.write_text(json.dumps({"router": {"admin_token": ADMIN_TOKEN, "data_dir": str(tmp_path / "router"),
                                                 "billing_leases": True}}))
        router_proc, router = start_service("router", ["--config", str(config), "--inference", inference,
                                                       "--billing", billing], processes)
        drain(router_proc)
        channel = grpc.aio.insecure_channel(router)
        key = await admin_grpc.AdminServiceStub(channel).CreateApiKey(
            admin_pb2.CreateApiKeyRequest(tenant_id="drill"), metadata=[("authorization", f"Bearer {ADMIN_TOKEN}")],
            timeout=10)
        complete = router_grpc.RouterServiceStub(channel).Complete
        served: list[pb2.CompleteResponse] = []

        async def admitted_by_lease() -> bool:
            before = holds(tmp_path)
            served.append(await complete(REQUEST, metadata=bearer(key.secret), timeout=60))
            return holds(tmp_path) == before

        await wait_until(admitted_by_lease, 90, "a request admitted against the router's lease", interval=0.2)

        billing_proc.kill()  # SIGKILL under load: the lease serves on
        billing_proc.wait()
        for _ in range(2):
            served.append(await complete(REQUEST, metadata=bearer(key.secret), timeout=60))
        billing_proc, _ = start_service("billing", billing_args, processes)  # back on its port, same ledger
        drain(billing_proc)
        await settled_rows(BillingOnly(stub, tmp_path / "router"), "drill", len(served))  # type: ignore[arg-type]

        os.kill(billing_proc.pid, signal.SIGSTOP)  # frozen: billing's calls now time out
        refused: grpc.aio.AioRpcError | None = None
        for _ in range(100):
            try:
                served.append(await complete(REQUEST, metadata=bearer(key.secret), timeout=60))
            except grpc.aio.AioRpcError as exc:
                refused = exc
                break
        assert refused is not None, "requests were served past the lease while billing was frozen"
        assert refused.code() == grpc.StatusCode.UNAVAILABLE
        assert f"lease on hard budget {created.budget.budget_id}" in refused.details()
        os.kill(billing_proc.pid, signal.SIGCONT)
        report = await settled_rows(BillingOnly(stub, tmp_path / "router"), "drill", len(served))  # type: ignore[arg-type]
        await channel.close()
        await operator.close()
    finally:
        if billing_proc is not None and billing_proc.poll() is None:
            os.kill(billing_proc.pid, signal.SIGCONT)
        stop(processes)
    assert report.total.requests == len(served)  # none missing, none doubled
    assert report.total.cost.micros == sum(r.cost.micros for r in served) <= 41 * 500
