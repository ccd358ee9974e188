"""The billing outage drill at full scale, with real processes and `billing_leases` on, on SQLite and on
PostgreSQL billing. Callers of two tenants keep a steady load on the router throughout; each tenant has a
hard budget (a small one and a large one). Billing is SIGKILLed under that load (requests within the
leases are served, their usage resent over a new StreamUsage stream once billing is back on its port),
then frozen with SIGSTOP for `OUTAGE_S` seconds (calls time out instead of failing fast): requests within
the leases are served, and once a budget's lease is spent or expires its requests are refused with
UNAVAILABLE naming the budget, never served unbilled. After billing returns both tenants are served again
and the ledger holds exactly the requests served, none missing or doubled."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from pathlib import Path

import grpc
import pytest

from autoglm.billing.v1 import billing_service_pb2 as billing_pb2
from autoglm.billing.v1 import billing_service_pb2_grpc as billing_grpc
from autoglm.common.v1 import money_pb2
from autoglm.router.v1 import admin_service_pb2 as admin_pb2
from autoglm.router.v1 import admin_service_pb2_grpc as admin_grpc
from autoglm.router.v1 import router_service_pb2 as pb2
from autoglm.router.v1 import router_service_pb2_grpc as router_grpc
from services.cli.endpoint import billing_token, operator_channel
from services.common.ports import free_port
from tests.integration.billing.conftest import PgServer, postgres  # noqa: F401  (the session fixture)
from tests.integration.router.conftest import ADMIN_TOKEN, MODEL
from tests.integration.router.service_process import drain, start_service, stop
from tests.integration.router.test_router_crash_after_answer import BillingOnly
from tests.integration.router.test_router_leases import REQUEST
from tests.integration.router.test_router_vertical import bearer, settled_rows
from tests.waiting import wait_until

OUTAGE_S = 60.0  # billing frozen this long under load
WORKERS = 4  # callers per tenant
PAUSE_S = 0.05  # a refused caller's pause before its next request (pacing, so refusals do not spin)
# Micro-USD, at about 40 a request: each lease (the router's spend rate x the 10 s refresh, between 1 % and
# 10 % of the limit) covers some seconds of this load, so both are spent within the outage.
BUDGETS = {"drill": 41 * 500 * 4, "steady": 41 * 500 * 10}


@pytest.fixture(params=["sqlite", "postgres"])
def billing_database(request: pytest.FixtureRequest) -> list[str]:
    if request.param == "sqlite":
        return []  # billing's default: SQLite in its data dir
    server: PgServer = request.getfixturevalue("postgres")
    return ["--database", server.create_database()]


class Load:
    """`WORKERS` callers per tenant sending REQUEST back to back; every answer and refusal, timed."""

    def __init__(self, complete: grpc.aio.UnaryUnaryMultiCallable, secrets: dict[str, str]) -> None:
        self.complete, self.secrets = complete, secrets
        self.served: dict[str, list[tuple[float, pb2.CompleteResponse]]] = {t: [] for t in secrets}
        self.refused: dict[str, list[tuple[float, grpc.aio.AioRpcError]]] = {t: [] for t in secrets}
        self.running = True
        self.tasks = [asyncio.ensure_future(self._caller(t)) for t in secrets for _ in range(WORKERS)]

    async def _caller(self, tenant: str) -> None:
        while self.running:
            try:
                reply = await self.complete(REQUEST, metadata=bearer(self.secrets[tenant]), timeout=60)
                self.served[tenant].append((time.monotonic(), reply))
            except grpc.aio.AioRpcError as exc:
                self.refused[tenant].append((time.monotonic(), exc))
                await asyncio.sleep(PAUSE_S)

    def count(self, tenant: str, since: float = 0.0) -> int:
        return sum(1 for at, _ in self.served[tenant] if at >= since)

    async def stop(self) -> None:
        self.running = False
        await asyncio.gather(*self.tasks)


async def leased(stub: billing_grpc.BillingServiceStub, load: Load) -> bool:
    """Both tenants are being served against their leases: every budget has a lease and no open hold."""
    budgets = (await stub.ListBudgets(billing_pb2.ListBudgetsRequest(), timeout=10)).budgets
    return all(load.count(t) for t in BUDGETS) and len(budgets) == len(BUDGETS) and \
        all(b.leased_amount.micros > 0 and b.held_amount.micros == 0 for b in budgets)


async def test_billing_killed_then_frozen_a_minute_under_load_serves_within_leases_and_bills_exactly(
        tmp_path: Path, billing_database: list[str]) -> None:
    processes: list = []
    port = free_port()
    billing_args = ["--data-dir", str(tmp_path / "billing"), *billing_database, "--port", str(port)]
    billing_proc = None
    load: Load | None = None
    try:
        billing_proc, billing = start_service("billing", billing_args, processes)  # the last --port wins
        drain(billing_proc)
        inference_proc, inference = start_service("inference", ["--replica-id", "r1", "--threads", "1"], processes)
        drain(inference_proc)
        operator = operator_channel(billing, billing_token(tmp_path / "billing"))
        stub = billing_grpc.BillingServiceStub(operator)
        await stub.CreatePrice(billing_pb2.CreatePriceRequest(price=billing_pb2.Price(
            model=MODEL, input_per_million=money_pb2.Money(currency_code="USD", micros=1_000_000),
            output_per_million=money_pb2.Money(currency_code="USD", micros=2_000_000)), actor="test"), timeout=10)
        budget_ids = {}
        for tenant, micros in BUDGETS.items():
            created = await stub.CreateBudget(billing_pb2.CreateBudgetRequest(budget=billing_pb2.Budget(
                scope=billing_pb2.BudgetScope(kind=billing_pb2.SCOPE_KIND_TENANT, tenant_id=tenant),
                period=billing_pb2.BudgetPeriod(kind=billing_pb2.PERIOD_KIND_DAILY),
                amount=money_pb2.Money(currency_code="USD", micros=micros),
                enforcement=billing_pb2.ENFORCEMENT_HARD), actor="test"), timeout=10)
            budget_ids[tenant] = created.budget.budget_id
        config = tmp_path / "mesh.yaml"
        config.write_text(json.dumps({"router": {"admin_token": ADMIN_TOKEN, "data_dir": str(tmp_path / "router"),
                                                 "billing_leases": True}}))
        router_proc, router = start_service("router", ["--config", str(config), "--inference", inference,
                                                       "--billing", billing], processes)
        drain(router_proc)
        channel = grpc.aio.insecure_channel(router)
        secrets = {}
        for tenant in BUDGETS:
            key = await admin_grpc.AdminServiceStub(channel).CreateApiKey(
                admin_pb2.CreateApiKeyRequest(tenant_id=tenant), timeout=10,
                metadata=[("authorization", f"Bearer {ADMIN_TOKEN}")])
            secrets[tenant] = key.secret
        load = Load(router_grpc.RouterServiceStub(channel).Complete, secrets)
        await wait_until(lambda: leased(stub, load), 90, "both tenants served against their leases", interval=0.2)

        billing_proc.kill()  # SIGKILL under load: the leases serve on
        billing_proc.wait()
        killed = time.monotonic()
        await wait_until(lambda: load.count("steady", killed) >= 10, 60, "requests served while billing is dead")
        billing_proc, _ = start_service("billing", billing_args, processes)  # back on its port, same ledger
        drain(billing_proc)
        await wait_until(lambda: leased(stub, load), 90, "the leases renewed once billing is back", interval=0.2)

        os.kill(billing_proc.pid, signal.SIGSTOP)  # frozen: billing's calls now time out
        frozen = time.monotonic()
        await asyncio.sleep(OUTAGE_S)  # the drill's length: the load runs on meanwhile
        os.kill(billing_proc.pid, signal.SIGCONT)
        thawed = time.monotonic()
        await wait_until(lambda: all(load.count(t, thawed) for t in BUDGETS), 120,
                         "both tenants served again once billing returns", interval=0.2)
        await load.stop()
        reports = {t: await settled_rows(BillingOnly(stub, tmp_path / "router"), t,  # type: ignore[arg-type]
                                         len(load.served[t])) for t in BUDGETS}
        await channel.close()
        await operator.close()
    finally:
        if load is not None and load.running:
            await load.stop()
        if billing_proc is not None and billing_proc.poll() is None:
            os.kill(billing_proc.pid, signal.SIGCONT)
        stop(processes)
    during = {t: [e for at, e in load.refused[t] if frozen <= at < thawed] for t in BUDGETS}
    assert load.count("steady", frozen) - load.count("steady", thawed) > 0, "nothing served within the lease"
    for tenant in BUDGETS:  # the lease spent or expired while billing was frozen: refused, precisely
        assert during[tenant], f"{tenant}: requests were served past the lease while billing was frozen"
        assert {e.code() for e in during[tenant]} == {grpc.StatusCode.UNAVAILABLE}, during[tenant][0].details()
        assert any(f"lease on hard budget {budget_ids[tenant]}" in e.details() for e in during[tenant])
        served = [reply for _, reply in load.served[tenant]]
        assert reports[tenant].total.requests == len(served)  # none missing, none doubled
        assert reports[tenant].total.cost.micros == sum(r.cost.micros for r in served) <= BUDGETS[tenant]
