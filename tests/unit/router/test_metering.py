"""Billing outages: interactive traffic continues within the grace period with usage spooled durably and
replayed in order; batch waits; settlement always sends exactly one event per request."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from pathlib import Path

import pytest

from services.common.errors import Unavailable
from services.router.metering import Meter
from services.router.ports import AlertLevel, Hold, HoldRequest, UsageRecord
from services.router.spool import SettlementJournal, UsageSpool, unsettled_events
from services.router.types import Money, TrafficClass, UsageStatus


class Billing:
    """A billing double for this unit: can be switched off; records what it receives."""

    def __init__(self) -> None:
        self.up = True
        self.recorded: list[str] = []

    def _check(self) -> None:
        if not self.up:
            raise Unavailable("down")

    async def reserve(self, request: HoldRequest) -> Hold:
        self._check()
        return Hold(hold_id=f"h-{request.request_id}")

    async def settle(self, hold_id: str, usage: UsageRecord) -> Money:
        self._check()
        self.recorded.append(usage.event_id)
        return Money("USD", 10)

    async def release(self, hold_id: str) -> None:
        self._check()

    async def record(self, usage: UsageRecord) -> Money:
        self._check()
        if usage.event_id not in self.recorded:
            self.recorded.append(usage.event_id)
        return Money("USD", 10)

    async def check_budget(self, tenant_id, api_key_id, tags, traffic_class) -> tuple[bool, AlertLevel]:
        self._check()
        return True, AlertLevel.NONE


def hold_request(rid: str, cls: TrafficClass = TrafficClass.INTERACTIVE) -> HoldRequest:
    return HoldRequest(rid, "acme", "k", "m", "v", cls, 10, 10)


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
    assert not meter.billing_down


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
