"""1,000 concurrent requests from one key against a hard budget that covers exactly 100 of them: at most
100 start, the rest are refused with RESOURCE_EXHAUSTED, and the spend never passes the budget. With the
prompt counted by the model's own tokenizer, a hold bounds only the completion: a budget for N chat
requests serves N of them, spent to >= 95 %, never past it."""

from __future__ import annotations

import asyncio

import grpc

from autoglm.billing.v1 import billing_service_pb2 as billing_pb2
from autoglm.common.v1 import generation_pb2, money_pb2
from autoglm.router.v1 import router_service_pb2 as pb2
from services.common.generation import ChatMessage, Role
from services.inference.engine.model import LoadedModel
from tests.integration.router.conftest import MODEL, Mesh
from tests.integration.router.test_router_vertical import bearer, settled_rows

REQUESTS = 1000
COVERED = 100
OUTPUT_MICROS_PER_TOKEN = 1


async def _tenant_budget(mesh: Mesh, tenant: str, micros: int) -> None:
    await mesh.billing_stub.CreateBudget(billing_pb2.CreateBudgetRequest(budget=billing_pb2.Budget(
        scope=billing_pb2.BudgetScope(kind=billing_pb2.SCOPE_KIND_TENANT, tenant_id=tenant),
        period=billing_pb2.BudgetPeriod(kind=billing_pb2.PERIOD_KIND_DAILY),
        amount=money_pb2.Money(currency_code="USD", micros=micros), enforcement=billing_pb2.ENFORCEMENT_HARD,
    ), actor="test"), timeout=10)


async def test_chat_holds_bound_the_prompt_exactly_so_the_budget_is_spent_in_full(mesh: Mesh,
                                                                                  loaded_model: LoadedModel) -> None:
    # The probe, smaller: "Say hi.", max_tokens 8 (every answer reaches it); 1 micro-USD a token.
    await mesh.billing_stub.CreatePrice(billing_pb2.CreatePriceRequest(price=billing_pb2.Price(
        model=MODEL, input_per_million=money_pb2.Money(currency_code="USD", micros=1_000_000),
        output_per_million=money_pb2.Money(currency_code="USD", micros=1_000_000),
    ), actor="test"), timeout=10)
    prompt_tokens = len(loaded_model.encode(loaded_model.template.render((ChatMessage(Role.USER, "Say hi."),))))
    covered, requests = 30, 300
    budget = covered * (prompt_tokens + 8)
    await _tenant_budget(mesh, "probe", budget)
    secret, _ = await mesh.create_key("probe")
    request = pb2.CompleteRequest(
        model=MODEL, messages=[generation_pb2.ChatMessage(role=generation_pb2.CHAT_ROLE_USER, content="Say hi.")],
        cache_policy=pb2.CACHE_POLICY_BYPASS, sampling=generation_pb2.SamplingParams(temperature=0.0, max_tokens=8))

    async def one() -> pb2.CompleteResponse | grpc.StatusCode:
        try:
            return await mesh.router_stub.Complete(request, metadata=bearer(secret), timeout=300)
        except grpc.aio.AioRpcError as exc:
            return exc.code()

    outcomes = await asyncio.gather(*[one() for _ in range(requests)])
    served = [o for o in outcomes if isinstance(o, pb2.CompleteResponse)]
    assert {o for o in outcomes if not isinstance(o, pb2.CompleteResponse)} == {grpc.StatusCode.RESOURCE_EXHAUSTED}
    assert all((r.usage.prompt_tokens, r.usage.completion_tokens) == (prompt_tokens, 8) for r in served)
    report = await settled_rows(mesh, "probe", len(served))
    assert report.total.requests == len(served) == covered
    assert budget * 95 // 100 <= report.total.cost.micros <= budget  # >= 95 % spent, 0 overshoot


async def test_a_budget_for_100_requests_lets_at_most_100_of_1000_concurrent_start(mesh: Mesh) -> None:
    # Prompt tokens free, one output token = 1 micro-USD, max_tokens=1: a hold is exactly one request's cost.
    await mesh.billing_stub.CreatePrice(billing_pb2.CreatePriceRequest(price=billing_pb2.Price(
        model=MODEL, input_per_million=money_pb2.Money(currency_code="USD", micros=0),
        output_per_million=money_pb2.Money(currency_code="USD", micros=OUTPUT_MICROS_PER_TOKEN * 1_000_000),
    ), actor="test"), timeout=10)
    budget = COVERED * OUTPUT_MICROS_PER_TOKEN
    await _tenant_budget(mesh, "storm", budget)
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
