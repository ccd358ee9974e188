"""Budgets, prices, reports, alerts and the audit log over gRPC need an operator; the audit log's actor is
the operator identity billing established, not the `actor` a caller wrote in the request. The usage path
the router uses needs no operator."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import grpc
import pytest

from autoglm.billing.v1 import billing_service_pb2 as pb2
from autoglm.billing.v1 import billing_service_pb2_grpc as pb2_grpc
from services.billing.config import BillingConfig
from services.billing.server import build_server
from services.common.config import ServerSettings
from services.common.grpc_server import RunningServer
from tests.integration.billing.helpers import OPERATOR_TOKEN, operator, price_request, tenant_budget, usage

OPS = "spiffe://autoglm.local/ns/default/sa/operator"
ROUTER = "spiffe://autoglm.local/ns/default/sa/router"

OPERATOR_CALLS: dict[str, Any] = {
    "CreateBudget": tenant_budget("acme", tokens=1000),
    "GetBudget": pb2.GetBudgetRequest(budget_id="b1"),
    "ListBudgets": pb2.ListBudgetsRequest(),
    "UpdateBudget": pb2.UpdateBudgetRequest(budget=pb2.Budget(budget_id="b1", tokens=5)),
    "DeleteBudget": pb2.DeleteBudgetRequest(budget_id="b1"),
    "CreatePrice": price_request(),
    "DeletePrice": pb2.DeletePriceRequest(price_id="p1"),
    "GetUsageReport": pb2.GetUsageReportRequest(),
    "ListAuditEvents": pb2.ListAuditEventsRequest(),
}


async def _billing(serve, tmp_path: Path, **settings: Any) -> RunningServer:  # type: ignore[no-untyped-def]
    return await serve(build_server(BillingConfig(server=ServerSettings(port=0), data_dir=tmp_path,
                                                  database=f"sqlite:///{tmp_path / 'b.db'}", **settings)))


async def _refused(call: Any, code: grpc.StatusCode, message: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    assert caught.value.code() == code, caught.value.details()
    assert message in (caught.value.details() or "")
    assert "spiffe://" not in (caught.value.details() or "")


async def test_operator_calls_without_the_token_are_refused_and_usage_still_flows(serve, tmp_path: Path) -> None:
    running = await _billing(serve, tmp_path)  # no token configured: billing makes one in its data dir
    token = (tmp_path / "billing_operator_token").read_text().strip()
    async with grpc.aio.insecure_channel(running.address) as plain, operator(running, "wrong-token") as wrong:
        anonymous, impostor = pb2_grpc.BillingServiceStub(plain), pb2_grpc.BillingServiceStub(wrong)
        for method, request in OPERATOR_CALLS.items():
            await _refused(getattr(anonymous, method)(request, timeout=10), grpc.StatusCode.UNAUTHENTICATED,
                           "need a billing operator: send 'authorization: Bearer <token>'")
            await _refused(getattr(impostor, method)(request, timeout=10), grpc.StatusCode.UNAUTHENTICATED,
                           "operator token is not valid")
        watch = anonymous.WatchAlerts(pb2.WatchAlertsRequest(cursor="0"), timeout=10)
        await _refused(watch.read(), grpc.StatusCode.UNAUTHENTICATED, "need a billing operator")
        async with operator(running, token) as admin:
            await pb2_grpc.BillingServiceStub(admin).CreatePrice(price_request(), timeout=10)
        # What the router sends needs no operator: usage, holds, budget checks, the price table.
        recorded = await anonymous.RecordUsage(pb2.RecordUsageRequest(event=usage("e1")), timeout=10)
        hold = await anonymous.Reserve(pb2.ReserveRequest(tenant_id="acme", model="smollm2", request_id="r2",
                                                          max_prompt_tokens=10, max_completion_tokens=10), timeout=10)
        await anonymous.Settle(pb2.SettleRequest(hold_id=hold.hold_id, event=usage("r2")), timeout=10)
        stream = anonymous.StreamUsage(iter([pb2.StreamUsageRequest(event=usage("e3"))]), timeout=10)
        acks = [ack async for ack in stream]
        await anonymous.CheckBudget(pb2.CheckBudgetRequest(tenant_id="acme"), timeout=10)
        prices = await anonymous.ListPrices(pb2.ListPricesRequest(), timeout=10)
    assert recorded.event_id == "e1" and [a.event_id for a in acks] == ["e3"] and len(prices.prices) == 1


async def test_the_audit_actor_is_the_operator_identity_not_the_request_field(serve, tmp_path: Path) -> None:
    running = await _billing(serve, tmp_path, operator_token=OPERATOR_TOKEN)
    async with operator(running) as chan:
        stub = pb2_grpc.BillingServiceStub(chan)
        created = await stub.CreateBudget(pb2.CreateBudgetRequest(budget=tenant_budget("acme", tokens=10).budget,
                                                                  actor="the-ceo"), timeout=10)
        events = (await stub.ListAuditEvents(pb2.ListAuditEventsRequest(action="budget.create"), timeout=10)).events
    assert created.budget.budget_id
    [event] = events
    assert event.actor == "operator-token"
    assert json.loads(event.details_json)["claimed_actor"] == "the-ceo"


async def test_a_forwarded_mesh_identity_is_an_operator_only_when_trusted_and_listed(serve, tmp_path: Path) -> None:
    running = await _billing(serve, tmp_path, operator_token=OPERATOR_TOKEN, operator_identities=(OPS,),
                             trust_forwarded_identity=True)

    def forwarded(identity: str) -> list[tuple[str, str]]:
        return [("x-forwarded-client-cert", f"By=spiffe://autoglm.local/ns/default/sa/billing;URI={identity}")]

    async with grpc.aio.insecure_channel(running.address) as chan:
        stub = pb2_grpc.BillingServiceStub(chan)
        await stub.CreatePrice(price_request(), metadata=forwarded(OPS), timeout=10)
        await _refused(stub.CreatePrice(price_request(effective=2_000_000_000), metadata=forwarded(ROUTER),
                                        timeout=10), grpc.StatusCode.PERMISSION_DENIED, "not a billing operator")
        events = (await stub.ListAuditEvents(pb2.ListAuditEventsRequest(action="price.create"),
                                             metadata=forwarded(OPS), timeout=10)).events
    assert [e.actor for e in events] == [OPS]
