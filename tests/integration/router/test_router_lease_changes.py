"""A hard budget created or lowered while a router serves a caller under billing leases binds that router
at once (billing pushes the change over WatchLeases and commits it once the router stopped admitting
in-process), with SQLite and PostgreSQL billing.

"Overshoot beyond what was in flight when the change committed", precisely: the change's RPC returns
after its commit, so a request sent after it returned was admitted (if at all) after the commit. The
tests set the budget's room to nothing at the change (a new budget of 1 micro-unit, which no request's
worst case fits; or a limit lowered below what is already spent), so every admission after the commit is
overshoot: each request sent after the change returned must be refused with RESOURCE_EXHAUSTED, and
the budget's final spend may come only from requests sent before the change returned (those may have
been in flight at the commit). Before this, the router kept admitting under the leases it held until its
next refresh (here 30 s away), and these requests were served.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import grpc
import pytest

from autoglm.billing.v1 import billing_service_pb2 as billing_pb2
from autoglm.billing.v1 import billing_service_pb2_grpc as billing_grpc
from autoglm.common.v1 import money_pb2
from autoglm.router.v1 import router_service_pb2 as pb2
from services.billing.config import BillingConfig
from services.billing.server import build_server as build_billing
from services.cli.endpoint import billing_token, operator_channel
from services.inference.config import InferenceConfig
from services.inference.engine.model import LoadedModel
from services.inference.server import build_server as build_inference
from services.router.config import RouterConfig
from services.router.server import build_server as build_router
from tests.integration.billing.conftest import PgServer, postgres  # noqa: F401  (the session fixture)
from tests.integration.router.conftest import ADMIN_TOKEN, EPHEMERAL, MODEL, Mesh, start_mesh
from tests.integration.router.test_router_leases import REQUEST, _budget
from tests.integration.router.test_router_vertical import bearer, settled_rows
from tests.waiting import wait_until

# The router's next refresh is far away: only the pushed change can bind it within the test.
BILLING = {"lease_refresh_s": 30, "lease_ttl_s": 120}
WORKERS = 6
AFTER_S = 3.0  # traffic kept up after the change returned


@pytest.fixture(params=["sqlite", "postgres"])
def billing_database(request: pytest.FixtureRequest) -> str:
    if request.param == "sqlite":
        return ""  # billing's default: SQLite in its data dir
    server: PgServer = request.getfixturevalue("postgres")
    return server.create_database()


async def _mesh(serve, tmp_path, loaded_model: LoadedModel, database: str) -> Mesh:
    return await start_mesh(serve, tmp_path, loaded_model, billing_leases=True,
                            billing_settings={**BILLING, "database": database})


async def _leased(mesh: Mesh, secret: str) -> None:
    """Until a request is admitted in-process (no hold: the budget's held amount does not move)."""
    async def no_hold() -> bool:
        await mesh.router_stub.Complete(REQUEST, metadata=bearer(secret), timeout=60)
        before = (await mesh.billing_stub.ListBudgets(billing_pb2.ListBudgetsRequest(), timeout=10)).budgets
        await mesh.router_stub.Complete(REQUEST, metadata=bearer(secret), timeout=60)
        after = (await mesh.billing_stub.ListBudgets(billing_pb2.ListBudgetsRequest(), timeout=10)).budgets
        return all(b.leased_amount.micros > 0 for b in after) and \
            [b.held_amount.micros for b in before] == [b.held_amount.micros for b in after] == [0] * len(after)
    await wait_until(no_hold, 60, "requests admitted against the router's lease", interval=0.2)


async def _traffic_around(mesh: Mesh, secret: str, change: Callable[[], Awaitable[object]]
                          ) -> tuple[list[tuple[float, object]], float]:
    """Run WORKERS callers in a loop; after a second make the change, then keep on for AFTER_S. Returns
    (send time, outcome) per request and when the change returned."""
    outcomes: list[tuple[float, object]] = []
    returned: list[float] = []
    stop = asyncio.Event()

    async def caller() -> None:
        while not stop.is_set():
            sent = time.monotonic()
            try:
                outcome: object = await mesh.router_stub.Complete(REQUEST, metadata=bearer(secret), timeout=120)
            except grpc.aio.AioRpcError as exc:
                outcome = exc.code()
            outcomes.append((sent, outcome))

    async def changer() -> None:
        try:
            await asyncio.sleep(1.0)  # traffic under the leases first (a phase length, not synchronisation)
            await change()
            returned.append(time.monotonic())
            await asyncio.sleep(AFTER_S)
        finally:
            stop.set()

    await asyncio.gather(changer(), *[caller() for _ in range(WORKERS)])
    return outcomes, returned[0]


def _after(outcomes: list[tuple[float, object]], returned: float) -> list[object]:
    return [o for sent, o in outcomes if sent > returned]


async def test_a_hard_budget_created_mid_flight_binds_the_leasing_router_at_once(
        serve, tmp_path, loaded_model: LoadedModel, billing_database: str) -> None:
    mesh = await _mesh(serve, tmp_path, loaded_model, billing_database)
    try:
        await _budget(mesh, "acme", 10_000_000)
        secret, key = await mesh.create_key("acme")
        await _leased(mesh, secret)

        async def create() -> None:
            await mesh.billing_stub.CreateBudget(billing_pb2.CreateBudgetRequest(budget=billing_pb2.Budget(
                budget_id="key-cap", scope=billing_pb2.BudgetScope(kind=billing_pb2.SCOPE_KIND_API_KEY,
                                                                   tenant_id="acme", api_key_id=key.key_id),
                period=billing_pb2.BudgetPeriod(kind=billing_pb2.PERIOD_KIND_DAILY),
                amount=money_pb2.Money(currency_code="USD", micros=1), enforcement=billing_pb2.ENFORCEMENT_HARD,
            ), actor="test"), timeout=10)

        outcomes, returned = await _traffic_around(mesh, secret, create)
        served = [o for _, o in outcomes if isinstance(o, pb2.CompleteResponse)]
        await settled_rows(mesh, "acme", len(served))
        status = (await mesh.billing_stub.GetBudget(billing_pb2.GetBudgetRequest(budget_id="key-cap"),
                                                    timeout=10)).status
    finally:
        await mesh.channel.close()
        await mesh.billing_channel.close()
    after = _after(outcomes, returned)
    assert after, "no request was sent after the change"
    assert set(after) == {grpc.StatusCode.RESOURCE_EXHAUSTED}, \
        f"{sum(isinstance(o, pb2.CompleteResponse) for o in after)} of {len(after)} served after the commit"
    before = [o for sent, o in outcomes if sent <= returned and isinstance(o, pb2.CompleteResponse)]
    assert status.spent_amount.micros <= 1 + sum(o.cost.micros for o in before)


async def test_a_hard_budget_lowered_mid_flight_binds_the_leasing_router_at_once(
        serve, tmp_path, loaded_model: LoadedModel, billing_database: str) -> None:
    mesh = await _mesh(serve, tmp_path, loaded_model, billing_database)
    try:
        budget_id = await _budget(mesh, "acme", 10_000_000)
        secret, _ = await mesh.create_key("acme")
        await _leased(mesh, secret)

        async def lower() -> None:
            current = (await mesh.billing_stub.GetBudget(billing_pb2.GetBudgetRequest(budget_id=budget_id),
                                                         timeout=10)).status
            assert current.spent_amount.micros > 0
            await mesh.billing_stub.UpdateBudget(billing_pb2.UpdateBudgetRequest(budget=billing_pb2.Budget(
                budget_id=budget_id, amount=money_pb2.Money(currency_code="USD", micros=current.spent_amount.micros),
                enforcement=billing_pb2.ENFORCEMENT_HARD), actor="test"), timeout=10)

        outcomes, returned = await _traffic_around(mesh, secret, lower)
        served = [o for _, o in outcomes if isinstance(o, pb2.CompleteResponse)]
        await settled_rows(mesh, "acme", len(served))
    finally:
        await mesh.channel.close()
        await mesh.billing_channel.close()
    after = _after(outcomes, returned)
    assert after, "no request was sent after the change"
    assert set(after) == {grpc.StatusCode.RESOURCE_EXHAUSTED}, \
        f"{sum(isinstance(o, pb2.CompleteResponse) for o in after)} of {len(after)} served after the commit"


async def test_a_new_price_reaches_the_leasing_router_at_once(serve, tmp_path, loaded_model: LoadedModel) -> None:
    """Billing pushes a price change over the lease feed: the router's quotes use it within moments, though
    its table's poll (`price_refresh_s`) is an hour away (and billing honours a quote of the old price for an
    hour, so no charge that differs from the quote makes the router reload its table either)."""
    billing = await serve(build_billing(BillingConfig(server=EPHEMERAL, data_dir=tmp_path / "billing",
                                                      quote_grace_s=3600)))
    billing_channel = operator_channel(billing.address, billing_token(tmp_path / "billing"))
    stub = billing_grpc.BillingServiceStub(billing_channel)

    def price(micros: int) -> billing_pb2.CreatePriceRequest:
        return billing_pb2.CreatePriceRequest(price=billing_pb2.Price(
            model=MODEL, input_per_million=money_pb2.Money(currency_code="USD", micros=micros),
            output_per_million=money_pb2.Money(currency_code="USD", micros=2 * micros)), actor="test")

    await stub.CreatePrice(price(1_000_000), timeout=10)  # in the router's table from its start
    inference = await serve(build_inference(InferenceConfig(server=EPHEMERAL, intra_op_threads=1), model=loaded_model))
    router = await serve(build_router(RouterConfig(
        server=EPHEMERAL, inference_targets=(inference.address,), billing_target=billing.address,
        data_dir=tmp_path / "router", admin_token=ADMIN_TOKEN, price_refresh_s=3600, billing_leases=True)))
    mesh = Mesh(billing, inference, router, grpc.aio.insecure_channel(router.address), billing_channel,
                tmp_path / "router")
    try:
        secret, _ = await mesh.create_key("acme")
        first = await mesh.router_stub.Complete(REQUEST, metadata=bearer(secret), timeout=60)
        await stub.CreatePrice(price(50_000_000), timeout=10)  # in force at once

        async def quoted_at_the_new_price() -> bool:
            reply = await mesh.router_stub.Complete(REQUEST, metadata=bearer(secret), timeout=60)
            return reply.cost.micros >= 50 * first.cost.micros * 9 // 10
        await wait_until(quoted_at_the_new_price, 30, "a quote at the new price", interval=0.1)
    finally:
        await mesh.channel.close()
        await billing_channel.close()
