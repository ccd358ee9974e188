"""1,000 concurrent requests from one key against a hard budget that covers exactly 100 of them: at most
100 start, the rest are refused with RESOURCE_EXHAUSTED, and the spend never passes the budget."""

from __future__ import annotations

import asyncio

import grpc

from autoglm.billing.v1 import billing_service_pb2 as billing_pb2
from autoglm.common.v1 import generation_pb2, money_pb2
from autoglm.router.v1 import router_service_pb2 as pb2
from tests.integration.router.conftest import MODEL, Mesh
from tests.integration.router.test_router_vertical import bearer, settled_rows

REQUESTS = 1000
COVERED = 100
OUTPUT_MICROS_PER_TOKEN = 1


async def test_a_budget_for_100_requests_lets_at_most_100_of_1000_concurrent_start(mesh: Mesh) -> None:
    # Prompt tokens free, one output token = 1 micro-USD, max_tokens=1: a hold is exactly one request's cost.
    await mesh.billing_stub.CreatePrice(billing_pb2.CreatePriceRequest(price=billing_pb2.Price(
        model=MODEL, input_per_million=money_pb2.Money(currency_code="USD", micros=0),
        output_per_million=money_pb2.Money(currency_code="USD", micros=OUTPUT_MICROS_PER_TOKEN * 1_000_000),
    ), actor="test"), timeout=10)
    budget = COVERED * OUTPUT_MICROS_PER_TOKEN
    await mesh.billing_stub.CreateBudget(billing_pb2.CreateBudgetRequest(budget=billing_pb2.Budget(
        scope=billing_pb2.BudgetScope(kind=billing_pb2.SCOPE_KIND_TENANT, tenant_id="storm"),
        period=billing_pb2.BudgetPeriod(kind=billing_pb2.PERIOD_KIND_DAILY),
        amount=money_pb2.Money(currency_code="USD", micros=budget), enforcement=billing_pb2.ENFORCEMENT_HARD,
    ), actor="test"), timeout=10)
    secret, _ = await mesh.create_key("storm")
    request = pb2.CompleteRequest(model=MODEL, prompt="Hi", raw_prompt=True, cache_policy=pb2.CACHE_POLICY_BYPASS,
                                  sampling=generation_pb2.SamplingParams(temperature=0.0, max_tokens=1))

    async def one() -> pb2.CompleteResponse | grpc.StatusCode:
        try:
            return await mesh.router_stub.Complete(request, metadata=bearer(secret), timeout=120)
        except grpc.aio.AioRpcError as exc:
            return exc.code()

    outcomes = await asyncio.gather(*[one() for _ in range(REQUESTS)])
    served = [o for o in outcomes if isinstance(o, pb2.CompleteResponse)]
    refused = [o for o in outcomes if not isinstance(o, pb2.CompleteResponse)]
    assert 0 < len(served) <= COVERED
    assert set(refused) == {grpc.StatusCode.RESOURCE_EXHAUSTED}
    assert all(r.usage.completion_tokens == 1 for r in served)

    report = await settled_rows(mesh, "storm", len(served))
    assert report.total.requests == len(served)  # refused requests never reached the ledger
    assert report.total.cost.micros == sum(r.cost.micros for r in served) <= budget
