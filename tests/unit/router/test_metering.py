"""Billing outages: interactive traffic continues within the grace period with usage spooled durably and
replayed in order; batch waits; settlement always sends exactly one event per request. Billing fails
closed: only transport failures count as an outage, tenants at CRITICAL get no offline hold, and the
grace window runs from the outage's first failure."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from pathlib import Path

import grpc
import pytest

from services.common.errors import (
    BudgetExceeded,
    DomainError,
    FailedPrecondition,
    Internal,
    NotFound,
    PeerUnreachable,
    Unavailable,
)
from services.common.generation import TrafficClass
from services.common.peer_errors import billing_error
from services.common.usage import AlertLevel, UsageStatus
from services.router.metering import BillingUnavailable, Meter
from services.router.ports import Hold, HoldRequest, UsageRecord
from services.router.spool import SettlementJournal, UsageSpool, unsettled_events
from services.router.types import Money


class Billing:
    """A billing double for this unit: can be switched off; records what it receives."""

    def __init__(self) -> None:
        self.up = True
        self.recorded: list[str] = []
        self.levels: dict[str, AlertLevel] = {}  # what reserve reports per tenant (NONE when absent)
        self.failures: dict[str, list[DomainError]] = {}  # per method: errors raised by the next calls

    def _check(self, method: str = "") -> None:
        if not self.up:
            raise PeerUnreachable("down")
        if self.failures.get(method):
            raise self.failures[method].pop(0)

    async def reserve(self, request: HoldRequest) -> Hold:
        self._check("reserve")
        return Hold(hold_id=f"h-{request.request_id}", level=self.levels.get(request.tenant_id, AlertLevel.NONE))

    async def settle(self, hold_id: str, usage: UsageRecord) -> Money:
        self._check("settle")
        self.recorded.append(usage.event_id)
        return Money("USD", 10)

    async def release(self, hold_id: str) -> None:
        self._check()

    async def record(self, usage: UsageRecord) -> Money:
        self._check("record")
        if usage.event_id not in self.recorded:
            self.recorded.append(usage.event_id)
        return Money("USD", 10)

    async def check_budget(self, tenant_id, api_key_id, tags, traffic_class) -> tuple[bool, AlertLevel]:
        self._check()
        return True, AlertLevel.NONE


def hold_request(rid: str, cls: TrafficClass = TrafficClass.INTERACTIVE, tenant: str = "acme") -> HoldRequest:
    return HoldRequest(rid, tenant, "k", "m", "v", cls, 10, 10)


def answered(code: grpc.StatusCode, details: str) -> DomainError:
    """What the billing adapter raises when billing (or its sidecar) answers `code` without an ErrorDetail."""
    return billing_error(grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details=details))


def usage(rid: str) -> UsageRecord:
    now = datetime.now(UTC)
    return UsageRecord(rid, "acme", "k", "m", "v", 10, 3, UsageStatus.COMPLETED, TrafficClass.INTERACTIVE, rid,
                       "0" * 32, now, now, tags={"team": "x"})


async def test_outage_spools_in_order_and_replays_exactly_once(tmp_path: Path) -> None:
    billing = Billing()
    now = [0.0]
    meter = Meter(billing, UsageSpool(tmp_path / "spool.db"), grace_s=60, clock=lambda: now[0])
    hold = await meter.reserve(hold_request("r0"))
    assert await meter.settle(hold, usage("r0")) == Money("USD", 10)
    billing.up = False
    for rid in ("r1", "r2", "r3"):
        offline = await meter.reserve(hold_request(rid))
        assert offline.offline
        assert await meter.settle(offline, usage(rid)) is None
    with pytest.raises(Unavailable, match="batch"):  # batch waits, but this call's deadline has come
        await meter.reserve(hold_request("b1", TrafficClass.BATCH), deadline=now[0])
    now[0] = 61
    with pytest.raises(Unavailable, match="more than 60"):
        await meter.reserve(hold_request("r4"))
    # A restart keeps the spool.
    meter = Meter(billing, UsageSpool(tmp_path / "spool.db"), grace_s=60, clock=lambda: now[0])
    assert await meter.replay_once() == 0
    billing.up = True
    assert await meter.replay_once() == 3
    assert billing.recorded == ["r0", "r1", "r2", "r3"]
    assert await meter.replay_once() == 0


async def test_batch_reserve_waits_for_billing_to_come_back_instead_of_failing(tmp_path: Path) -> None:
    billing = Billing()
    billing.up = False
    attempts = []
    reserve = billing.reserve

    async def flaky(request: HoldRequest) -> Hold:
        attempts.append(request.request_id)
        billing.up = len(attempts) >= 3  # back on the third try
        return await reserve(request)

    billing.reserve = flaky  # type: ignore[method-assign]
    meter = Meter(billing, UsageSpool(tmp_path / "spool.db"), grace_s=60)
    hold = await meter.reserve(hold_request("b1", TrafficClass.BATCH))
    assert hold.hold_id == "h-b1" and not hold.offline and len(attempts) == 3
    assert meter.billing_down  # one answer so soon after the failures does not end the outage


async def test_batch_reserve_gives_up_before_its_deadline(tmp_path: Path) -> None:
    billing = Billing()
    billing.up = False
    now = [100.0]
    meter = Meter(billing, UsageSpool(tmp_path / "spool.db"), grace_s=60, clock=lambda: now[0])
    with pytest.raises(Unavailable, match="batch traffic waited"):
        await meter.reserve(hold_request("b1", TrafficClass.BATCH), deadline=100.05)


async def test_events_answered_but_not_settled_are_replayed_once_after_a_restart(tmp_path: Path) -> None:
    billing = Billing()
    first = Meter(billing, UsageSpool(tmp_path / "spool.db"), journal=SettlementJournal(tmp_path / "journal.bin"))
    first.note_answered(usage("settled"))
    first.note_settled(usage("settled"))
    first.note_answered(usage("lost-a"))
    first.note_answered(usage("lost-b"))  # the process dies here: neither was settled
    # The next start (new connections to the same files) sends both, in order, and each only once.
    spool = UsageSpool(tmp_path / "spool.db")
    journal = SettlementJournal(tmp_path / "journal.bin")
    second = Meter(billing, spool, journal=journal)
    second.recover_journal()
    assert len(journal) == 0 and len(spool) == 2
    await second.replay_once()
    second.recover_journal()
    await second.replay_once()
    assert billing.recorded == ["lost-a", "lost-b"]


async def test_early_starts_are_for_tenants_below_every_threshold_and_bounded(tmp_path: Path) -> None:
    billing = Billing()
    meter = Meter(billing, UsageSpool(tmp_path / "spool.db"), max_early_starts_per_tenant=2)
    assert not meter.may_start_before_hold("acme", TrafficClass.INTERACTIVE)  # billing has not spoken yet
    await meter.reserve(hold_request("r0"))
    assert meter.may_start_before_hold("acme", TrafficClass.INTERACTIVE)
    assert not meter.may_start_before_hold("acme", TrafficClass.BATCH)
    gate, both_asked = asyncio.Event(), asyncio.Event()
    asked: list[str] = []
    original = billing.reserve

    async def slow(request: HoldRequest) -> Hold:
        asked.append(request.request_id)
        if len(asked) == 2:
            both_asked.set()
        await gate.wait()
        return await original(request)

    billing.reserve = slow  # type: ignore[method-assign]
    waiting = [asyncio.create_task(meter.reserve_early(hold_request(f"r{i}"))) for i in (1, 2)]
    await both_asked.wait()
    assert not meter.may_start_before_hold("acme", TrafficClass.INTERACTIVE)  # two holds on the way already
    gate.set()
    await asyncio.gather(*waiting)
    assert meter.may_start_before_hold("acme", TrafficClass.INTERACTIVE)


async def test_the_journal_starts_over_when_nothing_is_outstanding_and_grows_when_it_must(tmp_path: Path) -> None:
    billing = Billing()
    path = tmp_path / "journal.bin"
    meter = Meter(billing, UsageSpool(tmp_path / "spool.db"), journal=SettlementJournal(path, capacity=4096))
    for i in range(50):  # ~20 KB of events through a 4 KB file
        meter.note_answered(usage(f"done-{i}"))
        meter.note_settled(usage(f"done-{i}"))
    files = [tmp_path / "journal.bin.0", tmp_path / "journal.bin.1"]
    assert [f.stat().st_size for f in files] == [4096, 4096]
    for i in range(30):  # ~12 KB outstanding at once: the file must grow to keep them
        meter.note_answered(usage(f"lost-{i}"))
    meter.note_settled(usage("lost-3"))
    assert max(f.stat().st_size for f in files) > 4096
    spool = UsageSpool(tmp_path / "spool.db")
    after_restart = Meter(billing, spool, journal=SettlementJournal(path, capacity=4096))
    after_restart.recover_journal()
    await after_restart.replay_once()
    assert billing.recorded == [f"lost-{i}" for i in range(30) if i != 3]
    assert after_restart.journal is not None and len(after_restart.journal) == 0


@pytest.mark.parametrize("code", [grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.UNAUTHENTICATED,
                                  grpc.StatusCode.DATA_LOSS, grpc.StatusCode.PERMISSION_DENIED,
                                  grpc.StatusCode.UNIMPLEMENTED])
async def test_a_billing_error_that_is_not_a_transport_failure_refuses_instead_of_an_offline_hold(
        tmp_path: Path, code: grpc.StatusCode) -> None:
    billing = Billing()
    spool = UsageSpool(tmp_path / "spool.db")
    meter = Meter(billing, spool, grace_s=60)
    await meter.reserve(hold_request("r0"))  # the tenant is known, below every threshold
    billing.failures["reserve"] = [answered(code, "spiffe://autoglm.local/ns/default/sa/router may not call "
                                                  "/autoglm.billing.v1.BillingService/Reserve on billing")]
    with pytest.raises(DomainError) as refused:
        await meter.reserve(hold_request("r1"))
    assert isinstance(refused.value, Internal) and not isinstance(refused.value, Unavailable | BudgetExceeded)
    assert "spiffe://" not in refused.value.message and "BillingService" not in refused.value.message
    assert not meter.billing_down and len(spool) == 0
    assert not (await meter.reserve(hold_request("r2"))).offline  # the next call goes to billing again


async def test_transport_failures_are_the_outage_that_grants_offline_holds(tmp_path: Path) -> None:
    billing = Billing()
    meter = Meter(billing, UsageSpool(tmp_path / "spool.db"), grace_s=60)
    await meter.reserve(hold_request("r0"))
    for code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        billing.failures["reserve"] = [answered(code, "connection refused")]
        assert (await meter.reserve(hold_request(f"r-{code.name}"))).offline
    assert meter.billing_down


@pytest.mark.parametrize("level", [AlertLevel.CRITICAL, AlertLevel.EMERGENCY])
async def test_a_tenant_last_seen_at_critical_or_above_gets_no_offline_hold(tmp_path: Path, level: AlertLevel) -> None:
    billing = Billing()
    billing.levels = {"hot": level}
    meter = Meter(billing, UsageSpool(tmp_path / "spool.db"), grace_s=60)
    for tenant in ("hot", "cool"):
        await meter.reserve(hold_request(f"{tenant}-0", tenant=tenant))
    billing.up = False
    with pytest.raises(BillingUnavailable, match=level.name):
        await meter.reserve(hold_request("hot-1", tenant="hot"))
    assert (await meter.reserve(hold_request("cool-1", tenant="cool"))).offline
    with pytest.raises(BillingUnavailable, match="not seen"):  # no budget state at all: no offline hold either
        await meter.reserve(hold_request("new-1", tenant="new"))


async def test_a_tenant_refused_for_its_budget_gets_no_offline_hold_when_billing_goes_down(tmp_path: Path) -> None:
    billing = Billing()
    meter = Meter(billing, UsageSpool(tmp_path / "spool.db"), grace_s=60)
    await meter.reserve(hold_request("r0"))
    billing.failures["reserve"] = [BudgetExceeded("monthly budget exhausted")]
    with pytest.raises(BudgetExceeded):
        await meter.reserve(hold_request("r1"))
    billing.up = False
    with pytest.raises(BillingUnavailable):
        await meter.reserve(hold_request("r2"))


async def test_the_grace_window_runs_from_the_first_failure_and_a_lucky_call_does_not_reset_it(
        tmp_path: Path) -> None:
    billing = Billing()
    now = [0.0]
    meter = Meter(billing, UsageSpool(tmp_path / "spool.db"), grace_s=60, recovery_s=10, clock=lambda: now[0])
    await meter.reserve(hold_request("r0"))
    billing.up = False
    assert (await meter.reserve(hold_request("r1"))).offline  # t=0: the outage starts
    for t in range(4, 60, 5):  # billing flaps: one call answered, the next one fails again
        now[0] = t
        billing.up = True
        assert not (await meter.reserve(hold_request(f"lucky-{t}"))).offline
        billing.up = False
        now[0] = t + 1
        assert (await meter.reserve(hold_request(f"r-{t}"))).offline
    assert meter.billing_down
    now[0] = 61.0
    with pytest.raises(BillingUnavailable, match="more than 60"):
        await meter.reserve(hold_request("r-late"))


async def test_the_outage_ends_at_a_call_answered_a_quiet_period_after_its_last_failure(tmp_path: Path) -> None:
    billing = Billing()
    now = [0.0]
    meter = Meter(billing, UsageSpool(tmp_path / "spool.db"), grace_s=60, recovery_s=10, clock=lambda: now[0])
    await meter.reserve(hold_request("r0"))
    billing.up = False
    assert (await meter.reserve(hold_request("r1"))).offline
    billing.up = True
    now[0] = 9.0
    await meter.reserve(hold_request("r2"))
    assert meter.billing_down  # answered 9 s after the last failure: not yet
    now[0] = 10.0
    await meter.reserve(hold_request("r3"))
    assert not meter.billing_down
    billing.up = False
    now[0] = 100.0  # a new outage, with a grace window of its own
    assert (await meter.reserve(hold_request("r4"))).offline
    now[0] = 159.0
    assert (await meter.reserve(hold_request("r5"))).offline


async def test_a_settlement_billing_refuses_is_spooled_once_and_never_blocks_or_loses_others(tmp_path: Path) -> None:
    billing = Billing()
    wall = [1000.0]
    spool = UsageSpool(tmp_path / "spool.db", clock=lambda: wall[0])
    meter = Meter(billing, spool, grace_s=60, refused_retry_s=30)
    holds = {rid: await meter.reserve(hold_request(rid)) for rid in ("a", "b", "c")}
    billing.failures["settle"] = [Internal("billing broke"), FailedPrecondition("hold expired")]
    billing.failures["record"] = [PeerUnreachable("gone")]
    assert await meter.settle(holds["a"], usage("a")) is None  # refused: kept in the spool
    assert await meter.settle(holds["b"], usage("b")) is None  # hold closed, then record not heard: kept
    assert len(spool) == 2 and billing.recorded == []
    assert await meter.settle(holds["c"], usage("c")) is None  # billing was just unreachable: straight to the spool
    billing.failures["record"] = [Internal("still broken")]  # the first replayed event is refused again
    assert await meter.replay_once() == 2  # ...and waits, while the events behind it go through
    assert billing.recorded == ["b", "c"] and len(spool) == 1
    assert await meter.replay_once() == 0  # deferred: not retried at once
    wall[0] += 30
    assert await meter.replay_once() == 1
    assert billing.recorded == ["b", "c", "a"] and len(spool) == 0


async def test_an_expired_hold_is_settled_by_recording_the_event_once(tmp_path: Path) -> None:
    billing = Billing()
    meter = Meter(billing, UsageSpool(tmp_path / "spool.db"))
    hold = await meter.reserve(hold_request("r0"))
    billing.failures["settle"] = [NotFound("hold does not exist")]
    assert await meter.settle(hold, usage("r0")) == Money("USD", 10)
    assert billing.recorded == ["r0"]


async def test_a_deferred_event_stays_deferred_across_a_restart(tmp_path: Path) -> None:
    wall = [1000.0]
    first = UsageSpool(tmp_path / "spool.db", clock=lambda: wall[0])
    first.append(usage("x"))
    (seq, _), = first.ready()
    first.defer(seq, 30)
    first.close()
    again = UsageSpool(tmp_path / "spool.db", clock=lambda: wall[0])
    assert len(again) == 1 and again.ready() == []
    wall[0] += 30
    assert [u.event_id for _, u in again.ready()] == ["x"]


def test_unsettled_events_counts_what_the_journal_holds_answered_across_both_files(tmp_path: Path) -> None:
    path = tmp_path / "journal.bin"
    assert unsettled_events(path) == 0  # no journal yet
    journal = SettlementJournal(path, capacity=4096)
    for i in range(30):  # more than one 4 KB file holds: outstanding records are copied across
        journal.write(usage(f"ev-{i}"))
    assert unsettled_events(path) == 30
    for i in range(29):
        journal.clear(f"ev-{i}")
    assert unsettled_events(path) == 1
    journal.clear("ev-29")
    assert unsettled_events(path) == 0
    journal.close()


async def test_reserves_wait_their_turn_beyond_the_in_flight_bound_and_give_up_at_their_deadline(
        tmp_path: Path) -> None:
    """A burst of per-request Reserves (a budget's edge, leases used up) keeps at most
    `max_reserves_in_flight` on the way to billing; the rest wait in turn, and one whose deadline comes
    while it waits is refused as billing busy (UNAVAILABLE), without a call."""
    billing = Billing()
    meter = Meter(billing, UsageSpool(tmp_path / "spool.db"), max_reserves_in_flight=2)
    gate, two_asked = asyncio.Event(), asyncio.Event()
    in_flight, most, asked = 0, 0, []
    original = billing.reserve

    async def slow(request: HoldRequest) -> Hold:
        nonlocal in_flight, most
        asked.append(request.request_id)
        if len(asked) == 2:
            two_asked.set()
        in_flight += 1
        most = max(most, in_flight)
        try:
            await gate.wait()
            return await original(request)
        finally:
            in_flight -= 1

    billing.reserve = slow  # type: ignore[method-assign]
    waiting = [asyncio.create_task(meter.reserve(hold_request(f"r{i}"))) for i in range(6)]
    await asyncio.wait_for(two_asked.wait(), 10)
    with pytest.raises(BillingUnavailable, match="deadline came first") as busy:
        await meter.reserve(hold_request("late"), deadline=time.monotonic() + 0.2)
    assert busy.value.reason == "BILLING_UNAVAILABLE" and "late" not in asked
    assert asked == ["r0", "r1"]  # the others still wait their turn
    gate.set()
    holds = await asyncio.gather(*waiting)
    assert [h.hold_id for h in holds] == [f"h-r{i}" for i in range(6)] and most == 2
