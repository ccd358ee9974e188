"""Budget holds around every request, and what happens when billing cannot be reached.

`reserve` holds the request's maximum cost; `settle` sends exactly one usage event (event id = request
id, so a retry can never count twice). When billing is unreachable, CORE and INTERACTIVE traffic
continues for `grace_s` seconds from the first failure with an offline hold, and its usage goes to the
durable spool, replayed in order by `replay_forever` once billing answers again. BATCH traffic waits
for billing to come back — retrying with backoff until the call's deadline (or `batch_wait_s`) — and then
fails with `BillingUnavailable`; so does everything once the grace period is over.

`may_start_before_hold` lets the gateway overlap the hold's round trip with the start of the generation
(prompt prefill) for tenants billing last placed below every alert threshold: nothing reaches the caller
before the hold is granted, and a refused hold cancels the generation. At most
`max_early_starts_per_tenant` such requests wait for their holds at once, so a tenant that runs into its
budget wastes at most that many prompt prefills.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import structlog

from services.common.errors import BudgetExceeded, DomainError, FailedPrecondition, NotFound, Unavailable
from services.common.pricing import PriceTable, cost_micros, micros_since_epoch
from services.router.ports import AlertLevel, BillingPort, Hold, HoldRequest, UsageRecord
from services.router.spool import SettlementJournal, UsageSpool
from services.router.types import Money, TrafficClass

log = structlog.get_logger(__name__)

OFFLINE_HOLD = "offline"
# Batch calls give up this long before their deadline, so the caller gets a precise reason.
DEADLINE_MARGIN_S = 0.1


class BillingUnavailable(Unavailable):
    """Billing cannot be reached and this request may not go on without it."""

    reason = "BILLING_UNAVAILABLE"


class Meter:
    def __init__(
        self,
        billing: BillingPort,
        spool: UsageSpool,
        grace_s: float = 300.0,
        clock: Callable[[], float] = time.monotonic,
        batch_wait_s: float = 300.0,
        max_early_starts_per_tenant: int = 8,
        journal: SettlementJournal | None = None,
    ) -> None:
        self.journal = journal
        self._batch_wait_s = batch_wait_s
        self._max_early = max_early_starts_per_tenant
        self._early: dict[str, int] = {}
        self.prices = PriceTable()
        self._levels: dict[str, AlertLevel] = {}
        self._prices_loaded_at: float | None = None
        self._billing = billing
        self._spool = spool
        self._grace_s = grace_s
        self._clock = clock
        self._down_since: float | None = None
        self._wake = asyncio.Event()

    @property
    def billing_down(self) -> bool:
        return self._down_since is not None

    def _mark_up(self) -> None:
        if self._down_since is not None:
            log.info("billing_reachable_again", spooled=len(self._spool))
            self._down_since = None
            self._wake.set()

    def _mark_down(self) -> None:
        if self._down_since is None:
            self._down_since = self._clock()
            log.warning("billing_unreachable", grace_s=self._grace_s)

    async def reserve(self, request: HoldRequest, deadline: float | None = None) -> Hold:
        waited_since: float | None = None
        delay = 0.05
        while True:
            try:
                hold = await self._billing.reserve(request)
            except Unavailable:
                self._mark_down()
                assert self._down_since is not None
                now = self._clock()
                if request.traffic_class != TrafficClass.BATCH:
                    if now - self._down_since > self._grace_s:
                        raise BillingUnavailable(
                            f"billing has been unreachable for more than {self._grace_s:.0f} s; requests wait"
                            " until it returns") from None
                    return Hold(hold_id=OFFLINE_HOLD, offline=True)
                waited_since = now if waited_since is None else waited_since
                give_up = waited_since + self._batch_wait_s
                if deadline is not None:
                    give_up = min(give_up, deadline - DEADLINE_MARGIN_S)
                if now + delay >= give_up:
                    raise BillingUnavailable(
                        f"billing is unreachable; batch traffic waited {now - waited_since:.1f} s for it to return"
                        " and the call's deadline is near; retry later") from None
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)
                continue
            except BudgetExceeded:
                self._levels[request.tenant_id] = AlertLevel.CRITICAL
                raise
            self._mark_up()
            self._levels[request.tenant_id] = hold.level
            return hold

    def may_start_before_hold(self, tenant_id: str, traffic_class: TrafficClass) -> bool:
        """Whether a generation may start while its hold is still on the way (see the module docstring)."""
        return (
            self._max_early > 0 and traffic_class != TrafficClass.BATCH and not self.billing_down
            and self._levels.get(tenant_id) == AlertLevel.NONE and self._early.get(tenant_id, 0) < self._max_early
        )

    async def reserve_early(self, request: HoldRequest, deadline: float | None = None) -> Hold:
        """`reserve`, counted against the tenant's early-start allowance while it is outstanding."""
        tenant = request.tenant_id
        self._early[tenant] = self._early.get(tenant, 0) + 1
        try:
            return await self.reserve(request, deadline)
        finally:
            left = self._early[tenant] - 1
            if left:
                self._early[tenant] = left
            else:
                del self._early[tenant]

    def may_skip_hold(self, tenant_id: str) -> bool:
        """A cache hit may go without a hold when billing last said this tenant is below CRITICAL."""
        level = self._levels.get(tenant_id)
        return level is not None and level < AlertLevel.CRITICAL and not self.billing_down

    def local_cost(self, usage: UsageRecord) -> Money | None:
        """The cost billing will charge for this usage (billing's price table from ListPrices, priced with
        the same lookup and formula, `services.common.pricing`), or None when no price is known here.
        The table is refreshed every few seconds: a price that billing puts in force at once is quoted
        from the next refresh on; until then billing's answer differs, which is logged and triggers a
        refresh."""
        price = self.prices.lookup(usage.model, usage.model_version, micros_since_epoch(usage.end_time))
        if price is None:
            return None
        return Money(price.currency, cost_micros(price, usage.prompt_tokens, usage.completion_tokens, usage.cached))

    async def refresh_prices(self, min_interval_s: float = 0.0) -> None:
        """Reload the price table from billing (at most once per `min_interval_s`)."""
        now = self._clock()
        if self._prices_loaded_at is not None and now - self._prices_loaded_at < min_interval_s:
            return
        self._prices_loaded_at = now
        try:
            self.prices = PriceTable(await self._billing.list_prices())
        except DomainError as exc:
            log.warning("price_refresh_failed", reason=exc.reason)

    async def refresh_prices_forever(self, interval_s: float = 5.0) -> None:
        while True:
            await self.refresh_prices()
            await asyncio.sleep(interval_s)

    def recover_journal(self) -> None:
        """At start: events an earlier run answered but never settled go to the spool (replayed in order)."""
        if self.journal is not None and (moved := self.journal.recover(self._spool)):
            log.warning("unsettled_usage_recovered", events=moved)
            self._wake.set()

    def note_answered(self, usage: UsageRecord) -> None:
        """Before the caller is answered with a cost not yet settled: keep the event durably until it is."""
        if self.journal is not None:
            self.journal.write(usage)

    def note_settled(self, usage: UsageRecord) -> None:
        if self.journal is not None:
            self.journal.clear(usage.event_id)

    async def settle(self, hold: Hold, usage: UsageRecord) -> Money | None:
        """Send the usage event; None when it went to the spool (cost not known yet)."""
        if hold.offline or self.billing_down:
            self._spool.append(usage)
            self._wake.set()
            return None
        try:
            if not hold.hold_id:  # no hold was taken (a cache hit): record the usage directly
                cost = await self._billing.record(usage)
            else:
                cost = await self._billing.settle(hold.hold_id, usage)
        except Unavailable:
            self._mark_down()
            self._spool.append(usage)
            return None
        except (NotFound, FailedPrecondition):
            # The hold expired or was already closed: the usage still counts, once, by its event id.
            cost = await self._billing.record(usage)
        self._mark_up()
        return cost

    async def check_level(self, tenant_id: str, key_id: str, tags: dict[str, str]) -> AlertLevel:
        _, level = await self._billing.check_budget(tenant_id, key_id, tags, TrafficClass.BATCH)
        return level

    async def replay_once(self) -> int:
        try:
            sent = await self._spool.replay(self._billing.record)
        except Unavailable:
            self._mark_down()
            return 0
        if sent:
            log.info("usage_spool_replayed", events=sent)
        self._mark_up()
        return sent

    async def replay_forever(self, interval_s: float = 1.0) -> None:
        """Background task: drain the spool whenever billing may be back."""
        while True:
            if len(self._spool):
                await self.replay_once()
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), interval_s)
            except TimeoutError:
                pass
