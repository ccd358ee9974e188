"""The router's lease book over a fake billing: a request is admitted in-process only when every lease
that applies covers its worst case, the unused part comes back when it ends, leases are refreshed before
they run low (reporting what was consumed), idle callers' leases are returned, and anything uncertain
(unknown caller, near expiry, a level that refuses the traffic, billing failing) falls back to Reserve."""

from __future__ import annotations

from dataclasses import dataclass, field

from services.common.errors import PeerUnreachable
from services.common.generation import TrafficClass
from services.common.usage import AlertLevel
from services.router.leasebook import LOOSE_ROOM, BudgetChange, LeaseBook, LeaseGrant

INTERACTIVE = TrafficClass.INTERACTIVE


@dataclass
class FakeBilling:
    """Grants `room` more on each budget per acquire (cumulative), like billing's monotonic grant."""

    budgets: dict[str, bool]  # budget id -> in tokens
    room: dict[str, int]
    expire_in_s: float = 60.0
    level: AlertLevel = AlertLevel.NONE
    down: bool = False
    granted: dict[str, int] = field(default_factory=dict)
    reported: list[dict[str, int]] = field(default_factory=list)
    returned: list[tuple[str, int]] = field(default_factory=list)

    async def acquire_leases(self, router_id: str, tenant_id: str, api_key_id: str, tags: dict[str, str],
                             consumed: dict[str, int]) -> list[LeaseGrant]:
        if self.down:
            raise PeerUnreachable("billing is unreachable")
        self.reported.append(dict(consumed))
        grants = []
        for budget_id, in_tokens in self.budgets.items():
            self.granted[budget_id] = self.granted.get(budget_id, 0) + self.room[budget_id]
            grants.append(LeaseGrant(f"lease-{budget_id}", budget_id, in_tokens, self.granted[budget_id],
                                     self.expire_in_s, 10.0, self.level))
        return grants

    async def return_lease(self, router_id: str, lease_id: str, consumed: int) -> bool:
        self.returned.append((lease_id, consumed))
        return True


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def known(book: LeaseBook) -> None:
    assert book.admit("acme", "k1", {}, INTERACTIVE, 1, 1) is None  # unknown: Reserve, and fetch its leases
    await book.refresh_once()


async def test_requests_are_admitted_while_the_lease_covers_their_worst_case_and_give_back_the_rest() -> None:
    billing = FakeBilling({"money": False}, {"money": 1000})
    book = LeaseBook(billing, "r1", clock=Clock())
    await known(book)
    first = book.admit("acme", "k1", {}, INTERACTIVE, 400, 50)
    second = book.admit("acme", "k1", {}, INTERACTIVE, 400, 50)
    assert first is not None and second is not None and first.lease_ids == ("lease-money",)
    assert book.admit("acme", "k1", {}, INTERACTIVE, 400, 50) is None  # 800 + 400 > 1000: per-request Reserve
    book.finish(first, 150, 20)  # it cost 150 of its worst 400
    assert book.room("money") == 1000 - 400 - 150
    assert book.admit("acme", "k1", {}, INTERACTIVE, 400, 50) is not None
    book.finish(second, 10_000, 0)  # never gives back more than the worst case it took
    assert book.room("money") == 1000 - 150 - 400 - 400


async def test_every_applicable_lease_must_cover_the_request_in_its_own_unit() -> None:
    billing = FakeBilling({"money": False, "tokens": True}, {"money": 10_000, "tokens": 100})
    book = LeaseBook(billing, "r1", clock=Clock())
    await known(book)
    admitted = book.admit("acme", "k1", {}, INTERACTIVE, 500, 60)
    assert admitted is not None and set(admitted.lease_ids) == {"lease-money", "lease-tokens"}
    assert book.admit("acme", "k1", {}, INTERACTIVE, 500, 60) is None  # money has room, tokens do not
    assert book.room("money") == 10_000 - 500  # a refused request takes nothing from any lease


async def test_a_caller_without_hard_budgets_needs_no_lease() -> None:
    book = LeaseBook(FakeBilling({}, {}), "r1", clock=Clock())
    await known(book)
    admitted = book.admit("acme", "k1", {}, INTERACTIVE, 10**9, 10**9)
    assert admitted is not None and admitted.lease_ids == ()


async def test_near_expiry_or_a_refusing_level_falls_back_to_reserve() -> None:
    clock = Clock()
    billing = FakeBilling({"money": False}, {"money": 1000}, expire_in_s=30, level=AlertLevel.CRITICAL)
    book = LeaseBook(billing, "r1", clock=clock, min_lifetime_s=20)
    await known(book)
    assert book.admit("acme", "k1", {}, TrafficClass.BATCH, 1, 1) is None  # BATCH pauses at CRITICAL
    assert book.admit("acme", "k1", {}, INTERACTIVE, 1, 1) is not None
    clock.now += 11  # 19 s left: a request may outlive the lease
    assert book.admit("acme", "k1", {}, INTERACTIVE, 1, 1) is None
    await book.refresh_once()  # the refresh it asked for extends the lease
    assert book.admit("acme", "k1", {}, INTERACTIVE, 1, 1) is not None


async def test_running_low_triggers_a_refresh_that_reports_consumption_and_never_lowers_the_grant() -> None:
    billing = FakeBilling({"money": False}, {"money": 1000})
    clock = Clock()
    book = LeaseBook(billing, "r1", clock=clock, low_water=0.25)
    await known(book)
    assert await book.refresh_once() == 0  # nothing is due
    for _ in range(7):
        assert book.admit("acme", "k1", {}, INTERACTIVE, 100, 1) is not None
    assert await book.refresh_once() == 0  # 300 of 1000 left: not yet below a quarter
    assert book.admit("acme", "k1", {}, INTERACTIVE, 100, 1) is not None  # 200 left: low
    assert await book.refresh_once() == 1
    assert billing.reported[-1] == {"lease-money": 800}
    assert book.room("money") == 2000 - 800
    billing.room["money"], billing.granted["money"] = 0, 500  # a stale or lower answer never shrinks the grant
    clock.now += 10  # due
    assert await book.refresh_once() == 1
    assert book.room("money") == 2000 - 800


async def test_idle_callers_return_their_leases_and_billing_failures_keep_the_current_ones() -> None:
    clock = Clock()
    billing = FakeBilling({"money": False}, {"money": 1000})
    book = LeaseBook(billing, "r1", clock=clock, idle_s=60)
    await known(book)
    admitted = book.admit("acme", "k1", {}, INTERACTIVE, 300, 1)
    assert admitted is not None
    billing.down = True
    clock.now += 11  # due for its refresh, which fails: the lease it has still admits
    await book.refresh_once()
    assert book.admit("acme", "k1", {}, INTERACTIVE, 300, 1) is not None
    billing.down = False
    clock.now += 61  # idle: returned with what is still in flight
    await book.refresh_once()
    assert billing.returned == [("lease-money", 600)]
    assert book.room("money") == 0 and book.admit("acme", "k1", {}, INTERACTIVE, 1, 1) is None


async def test_a_budget_change_stops_in_process_admission_for_its_scope_and_gives_up_the_changed_lease() -> None:
    billing = FakeBilling({"money": False}, {"money": 1000})
    book = LeaseBook(billing, "r1", clock=Clock())
    await known(book)
    assert book.admit("beta", "k9", {}, INTERACTIVE, 1, 1) is None
    await book.refresh_once()
    taken = book.admit("acme", "k1", {}, INTERACTIVE, 300, 10)
    assert taken is not None and book.admit("beta", "k9", {}, INTERACTIVE, 1, 1) is not None
    given = book.change(BudgetChange(7, "tenant", "acme", budget_id="money", ack_wanted=True))
    assert given == {"lease-money": 301}  # what was consumed of it: the answer billing returns it to
    assert book.admit("acme", "k1", {}, INTERACTIVE, 1, 1) is None  # per-request Reserve until re-acquired
    assert book.admit("beta", "k9", {}, INTERACTIVE, 1, 1) is None  # the given-up lease was beta's too


async def test_a_refresh_answered_across_a_budget_change_is_not_used() -> None:
    billing = FakeBilling({"money": False}, {"money": 1000})
    book = LeaseBook(billing, "r1", clock=Clock())
    answer = billing.acquire_leases

    async def changed_meanwhile(*args: object) -> list[LeaseGrant]:
        grants = await answer(*args)  # type: ignore[arg-type]
        book.change(BudgetChange(3, "api_key", "acme", "k1", budget_id="new", ack_wanted=True))
        return grants

    billing.acquire_leases = changed_meanwhile  # type: ignore[method-assign]
    await known(book)
    assert book.admit("acme", "k1", {}, INTERACTIVE, 1, 1) is None  # that answer may predate the new budget
    billing.acquire_leases = answer  # type: ignore[method-assign]
    await book.refresh_once()  # asked again at once
    assert book.admit("acme", "k1", {}, INTERACTIVE, 1, 1) is not None


async def test_the_first_message_of_each_watch_makes_the_book_relearn_every_caller() -> None:
    billing = FakeBilling({"money": False}, {"money": 1000})
    book = LeaseBook(billing, "r1", clock=Clock())
    await known(book)
    assert book.admit("acme", "k1", {}, INTERACTIVE, 1, 1) is not None
    assert book.change(BudgetChange(1)) == {}
    assert book.admit("acme", "k1", {}, INTERACTIVE, 1, 1) is None
    await book.refresh_once()
    assert book.admit("acme", "k1", {}, INTERACTIVE, 1, 1) is not None


async def test_a_request_not_yet_counted_is_admitted_loosely_only_far_from_the_leases_edge() -> None:
    billing = FakeBilling({"money": False}, {"money": LOOSE_ROOM * 100})
    book = LeaseBook(billing, "r1", clock=Clock())
    await known(book)
    loose = book.admit("acme", "k1", {}, INTERACTIVE, 100, 10, loose=True)  # room for exactly LOOSE_ROOM
    assert loose is not None
    # Room for fewer than LOOSE_ROOM more such requests: the prompt is counted first, and the exact
    # worst case is admitted down to the lease's last micro-unit.
    assert book.admit("acme", "k1", {}, INTERACTIVE, 100, 10, loose=True) is None
    exact = [book.admit("acme", "k1", {}, INTERACTIVE, 100, 10) for _ in range(LOOSE_ROOM - 1)]
    assert all(a is not None for a in exact)
    assert book.room("money") == 0
    book.finish(loose, 40, 4)  # what the loose bound held beyond its cost comes back
    assert book.room("money") == 60


async def test_no_request_is_admitted_loosely_once_a_budget_has_reached_an_alert_level() -> None:
    billing = FakeBilling({"money": False}, {"money": LOOSE_ROOM * 1000}, level=AlertLevel.WARNING)
    book = LeaseBook(billing, "r1", clock=Clock())
    await known(book)
    assert book.admit("acme", "k1", {}, INTERACTIVE, 100, 10, loose=True) is None
    assert book.admit("acme", "k1", {}, INTERACTIVE, 100, 10) is not None
