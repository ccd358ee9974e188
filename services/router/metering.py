"""Budget holds around every request, and what happens when billing cannot be reached.

`reserve` holds the request's maximum cost; `settle` sends exactly one usage event (event id = request
id, so a retry can never count twice).

Billing fails closed. Only a transport failure (`PeerUnreachable`: refused or reset connection, no
answer in time — see `services/common/peer_errors.py`) counts as "billing is down"; any other error
billing (or its sidecar) answers refuses the request with that error's status. While billing is down:

- CORE and INTERACTIVE requests get an offline hold — no budget check — only for tenants billing last
  placed below CRITICAL; a tenant last seen at CRITICAL or above, or not seen by this router yet, is
  refused with `BillingUnavailable`. Their usage goes to the durable spool, replayed in order by
  `replay_forever` once billing answers again.
- BATCH requests wait for billing to come back, retrying with backoff until the call's deadline (or
  `batch_wait_s`), then fail with `BillingUnavailable`.
- The outage starts at its first transport failure, and the grace window (`grace_s`) is measured from
  there: once it has passed, every request is refused with `BillingUnavailable`. The outage ends only at
  a successful call made at least `recovery_s` after its latest transport failure; a call that succeeds
  sooner (billing flapping) does not end it, so a lucky call never restarts the grace window.

Settlement never loses or doubles an event: a transport failure spools it; a hold billing no longer
knows (NOT_FOUND / FAILED_PRECONDITION) is settled by recording the event by its id instead; any other
refusal spools it too (logged). A spooled event billing refuses on replay stays in the spool, deferred by
`refused_retry_s`, instead of blocking the events behind it or being dropped.

With `billing_leases` on, `reserve` first tries this router's billing leases (`leasebook.LeaseBook`): a
request whose worst case (priced locally, with billing's price table) every applicable lease covers is
admitted in-process, with no billing call; its usage event names those leases and is recorded directly
(RecordUsage), and the unused part of its worst case goes back to the leases. Anything the book cannot
decide (unknown caller or price, a lease running out or near expiry, a level that refuses the traffic)
takes the per-request Reserve below, unchanged. With a usage stream (`usage_stream.UsageStream`), the
events of leased requests, and the spool's replays, go to billing in batches over one StreamUsage
stream instead of a RecordUsage call each; an event stays journaled until billing acked its commit.

Billing outages with leases on: a request every lease covers is served as ever (its event waits in the
stream's outbox and the journal until billing acks it). A caller with a hard budget whose lease cannot
cover the request (used up, expiring, never granted) gets no offline hold: it is refused with
`LeaseExhausted` (UNAVAILABLE, naming the budget and why) at once while billing's latest call failed in
transport, else after its Reserve did — never served unbilled. So is a caller whose budgets the lease
book has not learned yet (its leases still being fetched, or re-learned after a budget change): a hard
budget may apply to it. A caller under soft budgets only (no lease needed) keeps the grace window: served for `grace_s` from the outage's first failure, then refused with
`BillingUnavailable` until billing returns.

`may_start_before_hold` lets the gateway overlap the hold's round trip with the start of the generation
(prompt prefill) for tenants billing last placed below every alert threshold: nothing reaches the caller
before the hold is granted, and a refused hold cancels the generation. At most
`max_early_starts_per_tenant` such requests wait for their holds at once, so a tenant that runs into its
budget wastes at most that many prompt prefills.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import replace

import structlog

from services.common.errors import (
    BudgetExceeded,
    DomainError,
    FailedPrecondition,
    NotFound,
    PeerUnreachable,
    Unavailable,
)
from services.common.generation import TrafficClass
from services.common.pricing import PriceTable, cost_micros, micros_since_epoch
from services.common.usage import AlertLevel
from services.router import metrics
from services.router.leasebook import LeaseBook
from services.router.ports import BillingPort, Hold, HoldRequest, UsageRecord
from services.router.spool import SettlementJournal, UsageSpool
from services.router.types import Money
from services.router.usage_stream import UsageStream

log = structlog.get_logger(__name__)

OFFLINE_HOLD = "offline"
# Batch calls give up this long before their deadline, so the caller gets a precise reason.
DEADLINE_MARGIN_S = 0.1
MAX_QUOTES = 100_000  # quotes kept for events not sent yet


class BillingUnavailable(Unavailable):
    """Billing cannot be reached and this request may not go on without it."""

    reason = "BILLING_UNAVAILABLE"


class LeaseExhausted(BillingUnavailable):
    """Billing is unreachable and this router's lease on one of the caller's hard budgets cannot cover the
    request: it is refused rather than served unbilled."""

    reason = "BUDGET_LEASE_EXHAUSTED"


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
        recovery_s: float = 10.0,
        refused_retry_s: float = 60.0,
        leases: LeaseBook | None = None,
        stream: UsageStream | None = None,
        replay_wait_s: float = 5.0,
        max_reserves_in_flight: int = 64,
    ) -> None:
        if refused_retry_s <= 0:
            raise ValueError("refused_retry_s must be > 0")
        if max_reserves_in_flight < 1:
            raise ValueError("max_reserves_in_flight must be >= 1")
        self._reserve_slots = asyncio.Semaphore(max_reserves_in_flight)
        self.leases = leases
        self.stream = stream
        self._replay_wait_s = replay_wait_s
        self._replaying: set[int] = set()  # spool rows handed to the stream, not acked yet
        self._prices_wake = asyncio.Event()
        if leases is not None:
            leases.reachable = self._reachability
        if stream is not None:
            stream.reachable = self._reachability
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
        self._recovery_s = recovery_s
        self._refused_retry_s = refused_retry_s
        self._clock = clock
        self._outage_since: float | None = None  # the current outage's first transport failure
        self._last_failure: float | None = None  # its latest one
        self._failing = False  # the latest call to billing failed in transport
        self._wake = asyncio.Event()
        # event id -> the price its caller was quoted with, until the event is sent (bounded: oldest dropped).
        self._quoted: OrderedDict[str, str] = OrderedDict()

    @property
    def billing_down(self) -> bool:
        """In an outage: from its first transport failure until billing has recovered (module docstring)."""
        return self._outage_since is not None

    def _answered(self) -> None:
        """Billing answered a call: the outage ends if its latest failure is `recovery_s` old."""
        was_failing, self._failing = self._failing, False
        if self._outage_since is not None and self._last_failure is not None:
            if self._clock() - self._last_failure >= self._recovery_s:
                log.info("billing_reachable_again", spooled=len(self._spool),
                         outage_s=round(self._clock() - self._outage_since, 3))
                self._outage_since = self._last_failure = None
        if was_failing:
            self._wake.set()

    def _reachability(self, up: bool) -> None:
        """What the lease refreshes and the usage stream learn of billing (see `_answered`)."""
        if up:
            self._answered()
        else:
            self._unreachable()

    def _unreachable(self) -> None:
        now = self._clock()
        self._failing = True
        self._last_failure = now
        if self._outage_since is None:
            self._outage_since = now
            log.warning("billing_unreachable", grace_s=self._grace_s)

    def _offline_hold(self, request: HoldRequest, now: float) -> Hold:
        """An offline hold for a CORE or INTERACTIVE request while billing is down, or BillingUnavailable."""
        assert self._outage_since is not None
        if now - self._outage_since > self._grace_s:
            raise BillingUnavailable(
                f"billing has been unreachable for more than {self._grace_s:.0f} s; requests wait until it returns")
        level = self._levels.get(request.tenant_id)
        if level is None:
            raise BillingUnavailable("billing is unreachable and this router has not seen this tenant's budget "
                                     "state yet; requests wait until billing returns, retry later")
        if level >= AlertLevel.CRITICAL:
            raise BillingUnavailable(f"billing is unreachable and this tenant's budget was last at {level.name}; "
                                     "requests wait until billing returns, retry later")
        return Hold(hold_id=OFFLINE_HOLD, level=level, offline=True)

    def _leased(self, request: HoldRequest, loose: bool = False) -> Hold | None:
        """The request admitted against this router's leases, or None (then Reserve decides); `loose`: its
        prompt bound is looser than its real one (`LeaseBook.admit(loose=True)`), so it is never refused here."""
        if self.leases is None:
            return None
        worst = self._worst_micros(request)
        admitted = self.leases.admit(request.tenant_id, request.api_key_id, request.tags, request.traffic_class,
                                     worst, request.max_prompt_tokens + request.max_completion_tokens,
                                     loose=loose)
        if admitted is None:
            if self._failing and not loose:  # billing's latest call failed: a hard budget's lease that cannot cover it refuses
                self._refuse_beyond_lease(request, worst)
            return None
        if not admitted.lease_ids and self.billing_down:  # soft budgets only: the grace window
            assert self._outage_since is not None
            if self._clock() - self._outage_since > self._grace_s:
                raise BillingUnavailable(f"billing has been unreachable for more than {self._grace_s:.0f} s; "
                                         "requests wait until it returns, retry later")
        metrics.ADMISSIONS.labels("lease").inc()
        self._levels[request.tenant_id] = admitted.level  # as a Reserve's answer would tell it
        return Hold(hold_id="", level=admitted.level, admitted=admitted)

    def _worst_micros(self, request: HoldRequest) -> int | None:
        price = self.prices.lookup(request.model, request.model_version, time.time_ns() // 1000)
        return None if price is None else cost_micros(price, request.max_prompt_tokens, request.max_completion_tokens)

    def _refuse_beyond_lease(self, request: HoldRequest, worst_micros: int | None) -> None:
        """Billing is unreachable: raise LeaseExhausted when one of the caller's hard budgets has no lease
        that covers the request (the lease book knows the caller); else return (no hard budget known)."""
        if self.leases is None:
            return
        short = self.leases.shortfall(request.tenant_id, request.api_key_id, request.tags, worst_micros,
                                      request.max_prompt_tokens + request.max_completion_tokens,
                                      request.traffic_class)
        if short is not None:
            budget_id, why = short
            metrics.ADMISSIONS.labels("refused_lease").inc()
            raise LeaseExhausted(
                f"billing is unreachable and this router's lease on hard budget {budget_id} cannot cover this "
                f"request ({why}); it is refused rather than served unbilled: retry once billing is back, or "
                "ask for fewer max_tokens")

    def _refuse_unlearned(self, request: HoldRequest) -> None:
        """Billing is unreachable and the lease book has not learned the caller's budgets (its leases are
        still being fetched, or re-learned after a budget change): a hard budget may apply, so no offline
        hold — it is refused, as a hard budget's caller beyond its lease is."""
        if self.leases is None or self.leases.no_hard_budget(request.tenant_id, request.api_key_id, request.tags):
            return
        metrics.ADMISSIONS.labels("refused_lease").inc()
        raise BillingUnavailable(
            "billing is unreachable and this router has not yet learned whether a hard budget applies to this "
            "caller; the request is refused rather than served unbilled: retry in a few seconds")

    async def reserve(self, request: HoldRequest, deadline: float | None = None,
                      exact: Callable[[], Awaitable[int]] | None = None) -> Hold:
        """The request's hold: against this router's leases, else a Reserve. `exact` gives the prompt's
        exact token count when `request.max_prompt_tokens` is a looser bound: the leases are tried with the
        loose bound first (no tokenizer pass), and only what they cannot cover loosely is counted exactly."""
        leased = self._leased(request, loose=exact is not None)
        if leased is None and exact is not None:
            if (counted := await exact()) != request.max_prompt_tokens:
                request = replace(request, max_prompt_tokens=counted)
            leased = self._leased(request)
        if leased is not None:
            return leased
        waited_since: float | None = None
        delay = 0.05
        retried = False
        while True:
            try:
                hold = await self._ask_billing(request, deadline)
            except PeerUnreachable:
                self._unreachable()
                now = self._clock()
                self._refuse_beyond_lease(request, self._worst_micros(request))
                if request.traffic_class != TrafficClass.BATCH:  # (batch waits for billing: no offline hold)
                    self._refuse_unlearned(request)
                    offline = self._offline_hold(request, now)
                    metrics.ADMISSIONS.labels("offline").inc()
                    return offline
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
                self._answered()
                self._levels[request.tenant_id] = AlertLevel.CRITICAL
                if self.leases is not None and not retried and await self.leases.return_unusable(
                        request.tenant_id, request.api_key_id, request.tags, self._worst_micros(request),
                        request.max_prompt_tokens + request.max_completion_tokens):
                    retried = True  # this router's unusable lease room went back: the edge may fit it now
                    continue
                raise
            if hold.admitted is not None:  # its leases came while it waited its turn (`_ask_billing`)
                return hold
            self._answered()
            self._levels[request.tenant_id] = hold.level
            metrics.ADMISSIONS.labels("reserve").inc()
            return hold

    async def _ask_billing(self, request: HoldRequest, deadline: float | None) -> Hold:
        """A Reserve, with at most `max_reserves_in_flight` of them on the way from this router at once: at
        a budget's edge, once the leases are used up, a burst of requests waits here for billing's word in
        turn instead of flooding billing, whose sidecar sheds the calls beyond its concurrency limit (which
        would read as an outage). A request whose deadline comes first is refused as billing busy; one
        whose leases came while it waited (the caller's first requests go to Reserve while its leases are
        fetched) is admitted against them instead (the hold returned has `admitted` set)."""
        slots = self._reserve_slots
        waited = slots.locked()
        if waited:
            wait = None if deadline is None else deadline - self._clock() - DEADLINE_MARGIN_S
            try:
                await asyncio.wait_for(slots.acquire(), wait)
            except TimeoutError:
                metrics.ADMISSIONS.labels("refused_busy").inc()
                raise BillingUnavailable("this router's holds wait for billing, which is busy, and this "
                                         "request's deadline came first; retry later") from None
        else:
            await slots.acquire()
        try:
            if waited and (leased := self._leased(request)) is not None:
                return leased
            return await self._billing.reserve(request)
        finally:
            slots.release()

    def may_start_before_hold(self, tenant_id: str, traffic_class: TrafficClass) -> bool:
        """Whether a generation may start while its hold is still on the way (see the module docstring)."""
        return (
            self._max_early > 0 and traffic_class != TrafficClass.BATCH and not self.billing_down
            and self._levels.get(tenant_id) == AlertLevel.NONE and self._early.get(tenant_id, 0) < self._max_early
        )

    async def reserve_early(self, request: HoldRequest, deadline: float | None = None,
                            exact: Callable[[], Awaitable[int]] | None = None) -> Hold:
        """`reserve`, counted against the tenant's early-start allowance while it is outstanding."""
        tenant = request.tenant_id
        self._early[tenant] = self._early.get(tenant, 0) + 1
        try:
            return await self.reserve(request, deadline, exact)
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
        The table is refreshed every few seconds, so a price that billing puts in force at once is quoted
        from the next refresh on; the event names the price it was quoted with, and billing charges that
        one while it was in force within its `quote_grace_s`, so the quote and the charge agree."""
        price = self.prices.lookup(usage.model, usage.model_version, micros_since_epoch(usage.end_time))
        if price is None:
            return None
        self._quoted[usage.event_id] = price.price_id
        self._quoted.move_to_end(usage.event_id)
        while len(self._quoted) > MAX_QUOTES:
            self._quoted.popitem(last=False)
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

    def prices_changed(self) -> None:
        """Billing says a price changed: reload the table now."""
        self._prices_wake.set()

    async def refresh_prices_forever(self, interval_s: float = 5.0, pushed: Callable[[], bool] | None = None,
                                     pushed_interval_s: float = 60.0) -> None:
        """Reload the price table every `interval_s`, at once when `prices_changed`, and only every
        `pushed_interval_s` while `pushed()` says billing's change feed is connected (it pushes each change)."""
        while True:
            self._prices_wake.clear()
            await self.refresh_prices()
            wait = pushed_interval_s if pushed is not None and pushed() else interval_s
            try:
                await asyncio.wait_for(self._prices_wake.wait(), wait)
            except TimeoutError:
                pass

    def recover_journal(self) -> None:
        """At start: events an earlier run answered but never settled go to the spool (replayed in order)."""
        if self.journal is not None and (moved := self.journal.recover(self._spool)):
            log.warning("unsettled_usage_recovered", events=moved)
            self._wake.set()

    def _with_quote(self, usage: UsageRecord) -> UsageRecord:
        quoted = self._quoted.get(usage.event_id, "")
        return dataclasses.replace(usage, quoted_price_id=quoted) if quoted and not usage.quoted_price_id else usage

    @staticmethod
    def with_leases(hold: Hold, usage: UsageRecord) -> UsageRecord:
        """The event as billing must get it: naming the leases its request was admitted against (so a
        journal or spool replay moves its cost from those leases to spend, as the live event does)."""
        if hold.admitted is None or usage.lease_ids == hold.admitted.lease_ids:
            return usage
        return replace(usage, lease_ids=hold.admitted.lease_ids)

    def note_answered(self, usage: UsageRecord) -> None:
        """Before the caller is answered with a cost not yet settled: keep the event durably until it is."""
        if self.journal is not None:
            self.journal.write(self._with_quote(usage))

    def note_settled(self, usage: UsageRecord) -> None:
        if self.journal is not None:
            self.journal.clear(usage.event_id)

    async def settle(self, hold: Hold, usage: UsageRecord) -> Money | None:
        """Send the usage event; None when it went to the spool (cost not known yet). Never raises for what
        billing answers: an event billing did not acknowledge is in the spool when this returns."""
        local = None
        if hold.admitted is not None and self.leases is not None:
            local = self.local_cost(usage)
            self.leases.finish(hold.admitted, local.micros if local is not None else hold.admitted.worst_micros,
                               usage.prompt_tokens + usage.completion_tokens)
            usage = self.with_leases(hold, usage)
        usage = self._with_quote(usage)
        self._quoted.pop(usage.event_id, None)
        if self.stream is not None and hold.admitted is not None and local is not None:
            # Journaled by the caller: it waits in the stream's outbox (resent after a reconnect) until acked.
            try:
                return await self.stream.submit(usage)
            except DomainError as exc:
                log.error("usage_settle_refused", event_id=usage.event_id, reason=exc.reason, message=exc.message)
                self._spool_usage(usage)
                return None
        if hold.offline or self._failing:
            self._spool_usage(usage)
            return None
        try:
            cost = await self._send(hold, usage)
        except PeerUnreachable:
            self._unreachable()
            self._spool_usage(usage)
            return None
        except DomainError as exc:
            # Billing may or may not have it: the spool replays it by its event id, which billing counts once.
            log.error("usage_settle_refused", event_id=usage.event_id, reason=exc.reason, message=exc.message)
            self._spool_usage(usage)
            return None
        self._answered()
        return cost

    async def _send(self, hold: Hold, usage: UsageRecord) -> Money:
        if not hold.hold_id:  # no hold was taken (a cache hit): record the usage directly
            return await self._billing.record(usage)
        try:
            return await self._billing.settle(hold.hold_id, usage)
        except (NotFound, FailedPrecondition):
            # The hold expired or was already closed: the usage still counts, once, by its event id.
            return await self._billing.record(usage)

    def _spool_usage(self, usage: UsageRecord) -> None:
        self._spool.append(usage)
        self._wake.set()

    async def check_level(self, tenant_id: str, key_id: str, tags: dict[str, str]) -> AlertLevel:
        _, level = await self._billing.check_budget(tenant_id, key_id, tags, TrafficClass.BATCH)
        return level

    async def replay_once(self) -> int:
        """Send the spool's ready events in order; stop at a transport failure. An event billing refuses is
        kept, deferred by `refused_retry_s`. Returns how many billing acknowledged."""
        if self.stream is not None:
            return self._replayed(await self._replay_streamed(self.stream))
        sent = 0
        while batch := self._spool.ready():
            for seq, usage in batch:
                try:
                    await self._billing.record(usage)
                except PeerUnreachable:
                    self._unreachable()
                    return self._replayed(sent)
                except DomainError as exc:
                    log.error("spooled_usage_refused", event_id=usage.event_id, reason=exc.reason,
                              message=exc.message, retry_in_s=self._refused_retry_s)
                    self._spool.defer(seq, self._refused_retry_s)
                    continue
                self._spool.remove(seq)
                sent += 1
                self._answered()
        return self._replayed(sent)

    async def _replay_streamed(self, stream: UsageStream) -> int:
        """The spool's ready events through the usage stream, in batches; each row leaves the spool once
        billing acked it (deferred when refused). Waits at most `replay_wait_s` per batch: what is still
        unacked then stays in the stream's outbox and finishes in the background."""
        sent = 0
        while batch := [(seq, u) for seq, u in self._spool.ready(500) if seq not in self._replaying]:
            futures = {}
            for seq, usage in batch:
                self._replaying.add(seq)
                futures[stream.submit(usage)] = seq
            done, pending = await asyncio.wait(futures, timeout=self._replay_wait_s)
            for future in done:
                sent += self._replay_acked(futures[future], future)
            for future in pending:
                future.add_done_callback(functools.partial(self._replay_late, futures[future]))
            if pending:
                break
        return sent

    def _replay_late(self, seq: int, future: asyncio.Future[Money]) -> None:
        self._replay_acked(seq, future)

    def _replay_acked(self, seq: int, future: asyncio.Future[Money]) -> int:
        self._replaying.discard(seq)
        if future.cancelled():
            return 0
        if (exc := future.exception()) is not None:
            reason = exc.reason if isinstance(exc, DomainError) else type(exc).__name__
            log.error("spooled_usage_refused", seq=seq, reason=reason, retry_in_s=self._refused_retry_s)
            self._spool.defer(seq, self._refused_retry_s)
            return 0
        self._spool.remove(seq)
        return 1

    @staticmethod
    def _replayed(sent: int) -> int:
        if sent:
            log.info("usage_spool_replayed", events=sent)
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
