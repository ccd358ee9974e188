"""The router starts a generation while its budget hold is on the way only for tenants billing last placed
below every alert threshold — and a hold billing refuses then stops that generation with nothing sent."""

from __future__ import annotations

import grpc
import pytest

from autoglm.billing.v1 import billing_service_pb2 as billing_pb2
from autoglm.common.v1 import generation_pb2, money_pb2
from autoglm.inference.v1 import inference_service_pb2 as inf_pb2
from autoglm.inference.v1 import inference_service_pb2_grpc as inf_grpc
from autoglm.router.v1 import router_service_pb2 as pb2
from tests.integration.router.conftest import MODEL, Mesh
from tests.integration.router.test_router_vertical import bearer, settled_rows
from tests.waiting import wait_until

LONG = generation_pb2.SamplingParams(temperature=0.0, max_tokens=200)


async def test_a_refused_hold_stops_the_early_started_generation_and_sends_nothing(mesh: Mesh) -> None:
    secret, _ = await mesh.create_key("early")
    inference = inf_grpc.InferenceServiceStub(grpc.aio.insecure_channel(mesh.inference.address))

    async def load_after(cancelled_total: int) -> inf_pb2.WatchLoadResponse:
        """The replica's load, once it reports at least this many cancellations and no active sequence."""
        loads = inference.WatchLoad(inf_pb2.WatchLoadRequest(interval_ms=50), timeout=60)

        async def idle() -> inf_pb2.WatchLoadResponse | None:
            load = await loads.read()
            return load if load.cancelled_total >= cancelled_total and load.active_sequences == 0 else None

        try:
            return await wait_until(idle, 30, f"the replica to count {cancelled_total} cancellations and idle",
                                    interval=0)
        finally:
            loads.cancel()

    # A first request within budget: billing tells the router this tenant is below every threshold.
    first = await mesh.router_stub.Complete(pb2.CompleteRequest(
        model=MODEL, prompt="Say hi.", cache_policy=pb2.CACHE_POLICY_BYPASS,
        sampling=generation_pb2.SamplingParams(temperature=0.0, max_tokens=2)), metadata=bearer(secret), timeout=60)
    assert first.usage.completion_tokens >= 1
    before = await load_after(0)

    # Now the tenant's hard budget is already spent, which the router cannot know yet.
    await mesh.billing_stub.CreateBudget(billing_pb2.CreateBudgetRequest(budget=billing_pb2.Budget(
        scope=billing_pb2.BudgetScope(kind=billing_pb2.SCOPE_KIND_TENANT, tenant_id="early"),
        period=billing_pb2.BudgetPeriod(kind=billing_pb2.PERIOD_KIND_DAILY),
        amount=money_pb2.Money(currency_code="USD", micros=1), enforcement=billing_pb2.ENFORCEMENT_HARD,
    ), actor="test"), timeout=10)

    received: list[pb2.GenerateResponse] = []
    call = mesh.router_stub.Generate(pb2.GenerateRequest(model=MODEL, prompt="Write a long story about a dragon.",
                                                         sampling=LONG), metadata=bearer(secret), timeout=60)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        async for reply in call:
            received.append(reply)
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert received == []  # not one token before the hold
    # The replica had started the generation (it counts it as cancelled) and holds no sequence any more.
    after = await load_after(before.cancelled_total + 1)
    assert after.cancelled_total == before.cancelled_total + 1

    # The refusal taught the router: the next request waits for its hold and never reaches the replica.
    with pytest.raises(grpc.aio.AioRpcError) as again:
        await mesh.router_stub.Complete(pb2.CompleteRequest(model=MODEL, prompt="Write a poem.", sampling=LONG),
                                        metadata=bearer(secret), timeout=60)
    assert again.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    # A generation that ran through the replica after it: had the refused request started, its
    # cancellation would have been counted by now.
    async for _ in inference.Generate(inf_pb2.GenerateRequest(request_id="probe", prompt="Hi",
                                                              sampling=generation_pb2.SamplingParams(max_tokens=2)),
                                      timeout=60):
        pass
    settled = await load_after(0)
    assert settled.cancelled_total == after.cancelled_total

    # Only the first request reached the ledger.
    report = await settled_rows(mesh, "early")
    assert report.total.requests == 1
