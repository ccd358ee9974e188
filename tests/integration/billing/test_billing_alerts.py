"""Alert levels over a scripted month: 80/100/120 % fire once each, in order; a watcher that disconnects
and resumes from its cursor misses none and sees none twice; a new period and a raised limit re-arm them;
a budget's status lists each level fired in its period with its time (as the CLI and the console show it)."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from pathlib import Path

from autoglm.billing.v1 import billing_service_pb2 as pb2
from autoglm.billing.v1 import billing_service_pb2_grpc as pb2_grpc
from services.billing.config import BillingConfig
from services.billing.server import build_server
from services.cli.billing_commands import fired_levels
from services.common.config import ServerSettings
from services.router.billing_operator import as_dict
from services.router.http.console import views
from tests.integration.billing.helpers import OPERATOR_TOKEN, operator, price_request, tenant_budget, usage

DAY = 86_400
MARCH = datetime(2026, 3, 1, tzinfo=UTC).timestamp()
APRIL = datetime(2026, 4, 1, tzinfo=UTC).timestamp()


async def test_a_month_of_usage_fires_each_level_once_and_a_resumed_watcher_misses_nothing(serve, tmp_path: Path) -> None:
    now = [int(MARCH * 1e6)]
    config = BillingConfig(server=ServerSettings(port=0), database=f"sqlite:///{tmp_path / 'b.db'}",
                           operator_token=OPERATOR_TOKEN)
    running = await serve(build_server(config, clock=lambda: now[0]))
    async with operator(running) as chan:
        stub = pb2_grpc.BillingServiceStub(chan)
        await stub.CreatePrice(price_request())
        budget = (await stub.CreateBudget(tenant_budget("acme", tokens=3000))).budget

        async def day(n: int, tokens: int = 100, base: float = MARCH) -> None:
            now[0] = int((base + n * DAY + 3600) * 1e6)
            await stub.RecordUsage(pb2.RecordUsageRequest(event=usage(f"{base}-{n}", prompt=tokens, completion=0)))

        first_watch = stub.WatchAlerts(pb2.WatchAlertsRequest(cursor="0", tenant_id="acme"))
        for n in range(24):  # 2,400 tokens: 80 % on day 24
            await day(n)
        warning = await asyncio.wait_for(first_watch.read(), 10)
        first_watch.cancel()  # the watcher disconnects...
        for n in range(24, 31):  # ...while 100 % (day 30) and then 120 % (day 31, 400 tokens) are crossed
            await day(n, 100 if n < 30 else 700)
        resumed = stub.WatchAlerts(pb2.WatchAlertsRequest(cursor=warning.cursor, tenant_id="acme"))
        critical = await asyncio.wait_for(resumed.read(), 10)
        emergency = await asyncio.wait_for(resumed.read(), 10)
        await day(0, 2400, base=APRIL)  # a new month re-arms WARNING
        april = await asyncio.wait_for(resumed.read(), 10)
        await stub.UpdateBudget(pb2.UpdateBudgetRequest(budget=pb2.Budget(budget_id=budget.budget_id, tokens=3200)))
        await day(1, 160, base=APRIL)  # a raised limit re-arms: 2560/3200 = 80 %
        raised = await asyncio.wait_for(resumed.read(), 10)
        resumed.cancel()
        everything = stub.WatchAlerts(pb2.WatchAlertsRequest(cursor="0"))
        history = [await asyncio.wait_for(everything.read(), 10) for _ in range(5)]
        everything.cancel()
    march = [warning, critical, emergency]
    assert [a.level for a in march] == [pb2.ALERT_LEVEL_WARNING, pb2.ALERT_LEVEL_CRITICAL, pb2.ALERT_LEVEL_EMERGENCY]
    assert [a.utilization_permille for a in march] == [800, 1000, 1233]
    assert all(a.period_start.seconds == int(MARCH) for a in march)
    assert (april.level, april.period_start.seconds, april.utilization_permille) == (
        pb2.ALERT_LEVEL_WARNING, int(APRIL), 800)
    assert (raised.level, raised.utilization_permille) == (pb2.ALERT_LEVEL_WARNING, 800)
    assert [a.cursor for a in history] == [a.cursor for a in [*march, april, raised]]
    assert len({a.cursor for a in history}) == 5


async def test_each_level_fired_this_period_is_listed_with_its_time(serve, tmp_path: Path) -> None:
    now = [int(MARCH * 1e6)]
    config = BillingConfig(server=ServerSettings(port=0), database=f"sqlite:///{tmp_path / 'b.db'}",
                           operator_token=OPERATOR_TOKEN)
    running = await serve(build_server(config, clock=lambda: now[0]))
    async with operator(running) as chan:
        stub = pb2_grpc.BillingServiceStub(chan)
        await stub.CreatePrice(price_request())
        budget = (await stub.CreateBudget(tenant_budget("acme", tokens=1000))).budget

        async def spend(event_id: str, tokens: int, at: float) -> None:
            now[0] = int(at * 1e6)
            await stub.RecordUsage(pb2.RecordUsageRequest(event=usage(event_id, prompt=tokens, completion=0)))

        quiet = (await stub.GetBudget(pb2.GetBudgetRequest(budget_id=budget.budget_id))).status
        await spend("w", 850, MARCH + 2 * DAY)  # 85 %: WARNING
        await spend("c", 150, MARCH + 5 * DAY + 7)  # 100 %: CRITICAL, three days later
        got = (await stub.GetBudget(pb2.GetBudgetRequest(budget_id=budget.budget_id))).status
        listed = (await stub.ListBudgets(pb2.ListBudgetsRequest(tenant_id="acme"))).budgets
        await spend("a", 900, APRIL + DAY)  # a new period: only April's firing is its own
        april = (await stub.GetBudget(pb2.GetBudgetRequest(budget_id=budget.budget_id))).status
    assert list(quiet.fired) == []
    assert [(f.level, f.fire_time.seconds, f.utilization_permille) for f in got.fired] == [
        (pb2.ALERT_LEVEL_WARNING, int(MARCH + 2 * DAY), 850),
        (pb2.ALERT_LEVEL_CRITICAL, int(MARCH + 5 * DAY + 7), 1000)]
    assert list(listed[0].fired) == list(got.fired)
    assert [(f.level, f.fire_time.seconds) for f in april.fired] == [(pb2.ALERT_LEVEL_WARNING, int(APRIL + DAY))]
    # What `autoglm budget list` prints in its fired column, and what the console's Budgets page shows.
    assert fired_levels(got) == "WARNING 2026-03-03T00:00:00Z, CRITICAL 2026-03-06T00:00:07Z"
    assert views.budget(as_dict(got))["fired"] == [
        {"level": "WARNING", "time": "2026-03-03 00:00:00", "used": "85.0%"},
        {"level": "CRITICAL", "time": "2026-03-06 00:00:07", "used": "100.0%"}]
