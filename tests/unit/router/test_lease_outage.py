"""Billing outages with leases on (the meter over a billing double and a real lease book): requests within
a hard budget's lease are served; once the lease is used up or expires the budget's traffic is refused
with LeaseExhausted naming the budget (never an offline hold, never served unbilled), at once while
billing's latest call failed; callers under soft budgets only keep the grace window; leased usage and
the spool's replays go through the usage stream, not a call per event. At the edge, lease room too small
for a request goes back when its Reserve is refused, so the Reserve can use it."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from services.common.errors import BudgetExceeded
from services.common.generation import TrafficClass
from services.common.usage import AlertLevel
from services.router.leasebook import LeaseBook, LeaseGrant
from services.router.metering import BillingUnavailable, LeaseExhausted, Meter
from services.router.ports import Hold, HoldRequest
from services.router.spool import UsageSpool
from services.router.types import Money
from services.router.usage_stream import UsageStream
from tests.unit.router.test_leasebook import Clock, FakeBilling
from tests.unit.router.test_metering import Billing, usage
from tests.unit.router.test_usage_stream import Ledger


class LeasedBilling(Billing):
    """test_metering's billing double (switch `up` off) that also grants leases like test_leasebook's."""

    def __init__(self, leases: FakeBilling) -> None:
        super().__init__()
        self.leases = leases
        self.reserves = 0
        self.returned: list[tuple[str, int]] = []

    async def reserve(self, request: HoldRequest) -> Hold:
        self.reserves += 1
        return await super().reserve(request)

    async def acquire_leases(self, router_id: str, tenant_id: str, api_key_id: str, tags: dict[str, str],
                             consumed: dict[str, int]) -> list[LeaseGrant]:
        self._check()
        return await self.leases.acquire_leases(router_id, tenant_id, api_key_id, tags, consumed)

    async def return_lease(self, router_id: str, lease_id: str, consumed: int) -> bool:
        self.returned.append((lease_id, consumed))
        return True


def request(rid: str) -> HoldRequest:
    return HoldRequest(rid, "acme", "k", "m", "v", TrafficClass.INTERACTIVE, 10, 10)  # worst case 20 tokens


async def leased_meter(tmp_path: Path, budgets: dict[str, bool], room: dict[str, int],
                       grace_s: float = 300) -> tuple[LeasedBilling, Meter, Clock]:
    clock = Clock()
    billing = LeasedBilling(FakeBilling(budgets, room, expire_in_s=60))
    book = LeaseBook(billing, "r1", clock=clock, min_lifetime_s=20)
    meter = Meter(billing, UsageSpool(tmp_path / "spool.db"), grace_s=grace_s, clock=clock, leases=book)
    await meter.reserve(request("first"))  # an unknown caller: a Reserve while its leases are fetched
    await book.refresh_once()
    return billing, meter, clock


async def test_within_a_hard_lease_requests_are_served_and_beyond_it_refused_precisely(tmp_path: Path) -> None:
    billing, meter, clock = await leased_meter(tmp_path, {"tok-budget": True}, {"tok-budget": 50})
    billing.up = False
    served = [await meter.reserve(request(f"r{i}")) for i in range(2)]  # 2 x 20 of the lease's 50
    assert all(h.admitted is not None and not h.offline for h in served)
    reserves = billing.reserves
    with pytest.raises(LeaseExhausted, match=r"hard budget tok-budget .*used up: 10 tokens left") as refused:
        await meter.reserve(request("r2"))
    assert billing.reserves == reserves + 1  # it tried billing, which failed in transport
    assert refused.value.reason == "BUDGET_LEASE_EXHAUSTED" and isinstance(refused.value, BillingUnavailable)
    with pytest.raises(LeaseExhausted):
        await meter.reserve(request("r3"))
    assert billing.reserves == reserves + 1  # billing's latest call failed: refused without another try
    meter.leases.finish(served[0].admitted, 0, 5)  # type: ignore[union-attr]  # it used 5 of its 20
    assert (await meter.reserve(request("r4"))).admitted is not None  # the room it gave back serves another
    clock.now += 45  # the lease expires within min_lifetime_s: nothing more is admitted against it
    with pytest.raises(LeaseExhausted, match="expires in 15 s"):
        await meter.reserve(request("r5"))
    clock.now += 20
    with pytest.raises(LeaseExhausted, match="has expired"):
        await meter.reserve(request("r6"))


async def test_soft_budgets_only_keep_the_grace_window_during_an_outage(tmp_path: Path) -> None:
    billing, meter, clock = await leased_meter(tmp_path, {}, {}, grace_s=60)
    billing.up = False
    clock.now += 10  # the caller's refresh is due and finds billing down
    await meter.leases.refresh_once()  # type: ignore[union-attr]
    assert meter.billing_down
    assert (await meter.reserve(request("r1"))).admitted is not None  # no lease needed, within the grace
    clock.now += 61
    with pytest.raises(BillingUnavailable, match="more than 60 s"):
        await meter.reserve(request("r2"))
    billing.up = True
    clock.now += 11
    await meter.leases.refresh_once()  # type: ignore[union-attr]
    assert not meter.billing_down and (await meter.reserve(request("r3"))).admitted is not None


async def test_leased_usage_and_spool_replays_go_through_the_usage_stream(tmp_path: Path) -> None:
    ledger = Ledger()
    stream = UsageStream(ledger)
    billing = LeasedBilling(FakeBilling({}, {}))
    spool = UsageSpool(tmp_path / "spool.db")
    meter = Meter(billing, spool, leases=LeaseBook(billing, "r1"), stream=stream)
    task = asyncio.create_task(stream.run_forever())
    try:
        hold = await meter.reserve(request("first"))  # Reserve (unknown caller), settled by Settle
        assert await meter.settle(hold, usage("first")) == Money("USD", 10)
        await meter.leases.refresh_once()  # type: ignore[union-attr]
        leased = await meter.reserve(request("r1"))
        assert leased.admitted is not None
        meter.local_cost = lambda record: Money("USD", 30)  # type: ignore[method-assign]  # priced here
        assert await meter.settle(leased, usage("r1")) == Money("USD", 30)  # 10 x its 3 completion tokens
        for rid in ("s1", "s2", "s3"):
            spool.append(usage(rid))
        assert await meter.replay_once() == 3
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert billing.recorded == ["first"]  # nothing else took a call of its own
    assert ledger.messages == [["r1"], ["s1", "s2", "s3"]] and len(spool) == 0


async def test_a_refused_reserve_gives_back_lease_room_too_small_for_the_request_and_tries_again(
        tmp_path: Path) -> None:
    billing, meter, _ = await leased_meter(tmp_path, {"tok-budget": True}, {"tok-budget": 30})
    assert (await meter.reserve(request("r1"))).admitted is not None  # 20 of the lease's 30
    # 10 left: not enough for a 20-token worst case, so Reserve; billing counts those 10 as leased and refuses.
    billing.failures["reserve"] = [BudgetExceeded("budget tok-budget cannot cover this request")]
    hold = await meter.reserve(request("r2"))
    assert hold.hold_id == "h-r2"  # the room went back and the second Reserve was granted
    assert billing.returned == [("lease-tok-budget", 20)]  # it keeps what r1 may still spend
    billing.failures["reserve"] = [BudgetExceeded("budget tok-budget cannot cover this request")] * 2
    with pytest.raises(BudgetExceeded):  # nothing left to give back: refused, once
        await meter.reserve(request("r3"))
    assert billing.returned == [("lease-tok-budget", 20)]


async def test_a_caller_whose_budgets_are_not_learned_yet_gets_no_offline_hold_when_billing_is_down(
        tmp_path: Path) -> None:
    """Another key of a tenant with a hard budget, first seen while billing is down (or while its leases
    are still being fetched): the tenant's level is known, but a hard budget may apply to this caller, so
    it is refused — never an offline hold served beyond the budget."""
    billing, meter, _ = await leased_meter(tmp_path, {"tok-budget": True}, {"tok-budget": 50})
    billing.up = False
    other_key = HoldRequest("r1", "acme", "k2", "m", "v", TrafficClass.INTERACTIVE, 10, 10)
    for _ in range(2):  # each try reaches for billing, and is refused when it fails in transport
        with pytest.raises(BillingUnavailable, match="not yet learned whether a hard budget applies"):
            await meter.reserve(other_key)
    await meter.leases.refresh_once()  # type: ignore[union-attr]  # the refresh fails too: still not learned
    with pytest.raises(BillingUnavailable, match="not yet learned"):
        await meter.reserve(other_key)
    billing.up = True
    assert (await meter.reserve(other_key)).hold_id == "h-r1"  # billing answers again: its Reserve decides


@pytest.mark.parametrize(("level", "early"), [(AlertLevel.NONE, True), (AlertLevel.WARNING, False)])
async def test_a_caller_served_from_its_leases_alone_starts_early_only_below_every_threshold(
        tmp_path: Path, level: AlertLevel, early: bool) -> None:
    """The leases carry billing's latest level for the caller, as a Reserve's answer does: a tenant whose
    requests were all admitted against leases may overlap its next hold with the generation's start (when
    its leases say it is below every threshold), like one that went through Reserve."""
    clock = Clock()
    billing = LeasedBilling(FakeBilling({"tok-budget": True}, {"tok-budget": 1000}, expire_in_s=60, level=level))
    book = LeaseBook(billing, "r1", clock=clock, min_lifetime_s=20)
    meter = Meter(billing, UsageSpool(tmp_path / "spool.db"), clock=clock, leases=book)
    assert book.admit("acme", "k", {}, TrafficClass.INTERACTIVE, None, 20) is None  # unknown: its leases fetched
    await book.refresh_once()
    hold = await meter.reserve(request("r0"))
    assert hold.admitted is not None and billing.reserves == 0 and hold.level == level
    assert meter.may_start_before_hold("acme", TrafficClass.INTERACTIVE) is early


async def test_a_request_waiting_its_turn_for_a_reserve_takes_the_lease_that_came_meanwhile(tmp_path: Path) -> None:
    """A burst from a caller whose leases are still being fetched queues for Reserves (at most
    `max_reserves_in_flight` on the way); the ones still waiting when the leases arrive are admitted against
    them, so that room is not left idle on this router while billing refuses the rest for it."""
    clock = Clock()
    billing = LeasedBilling(FakeBilling({"tok-budget": True}, {"tok-budget": 1000}, expire_in_s=60))
    book = LeaseBook(billing, "r1", clock=clock, min_lifetime_s=20)
    meter = Meter(billing, UsageSpool(tmp_path / "spool.db"), clock=clock, leases=book, max_reserves_in_flight=1)
    gate, asked = asyncio.Event(), asyncio.Event()
    original = billing.reserve

    async def slow(req: HoldRequest) -> Hold:
        asked.set()
        await gate.wait()
        return await original(req)

    billing.reserve = slow  # type: ignore[method-assign]
    first = asyncio.create_task(meter.reserve(request("r0")))  # unknown caller: a Reserve, its leases wanted
    await asyncio.wait_for(asked.wait(), 10)
    queued = [asyncio.create_task(meter.reserve(request(f"r{i}"))) for i in (1, 2, 3)]
    await book.refresh_once()  # the leases arrive while r1..r3 wait for the one Reserve slot
    gate.set()
    holds = await asyncio.wait_for(asyncio.gather(first, *queued), 10)
    assert holds[0].hold_id == "h-r0" and holds[0].admitted is None
    assert all(h.admitted is not None and not h.hold_id for h in holds[1:])
    assert billing.reserves == 1
