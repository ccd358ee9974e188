"""The router's book of billing leases: admit a request's worst case in-process, without a billing call.

Billing grants this router a lease on each hard budget that applies to a caller (`AcquireLeases`, see
`services/billing/leases.py`): cumulative room `granted`, in the budget's unit (micro-units or tokens),
with an expiry. The book keeps, per budget, what this router has `consumed` of it: the worst case of the
requests in flight plus the actual cost of those that ended. Rules that keep billing exact:

- `admit` takes a request's worst case only when EVERY lease that applies to its caller has room for it
  (`consumed + worst <= granted`), none of them expires within `min_lifetime_s`, and no budget's level
  refuses its traffic class (BATCH at CRITICAL, all but CORE at EMERGENCY); otherwise it answers None and
  the caller falls back to a per-request Reserve, which is exact at the edge and says why it refuses.
- A caller the book knows nothing about yet is not admitted (None), and its leases are fetched in the
  background; a caller with no hard budget at all is admitted with no lease (nothing can refuse it).
- `finish` swaps the worst case for the actual cost when the request ends; the usage event names the
  lease ids (`Admitted.lease_ids`) so billing moves its cost from each lease's room to committed spend.
- `refresh_once` re-acquires the leases of callers whose room ran low (under `low_water` of the last
  grant), whose refresh interval passed or that are new, reporting `consumed` (billing never grants less);
  a caller idle for `idle_s` has its leases returned and is forgotten.

What a caller's budgets are is learned at each refresh; a budget created, changed or deleted since is
pushed by billing over a `WatchLeases` stream the book keeps open (`follow_changes`, reconnecting): on a
change that asks for an answer, the book stops admitting in-process for the callers in its scope (they
go to per-request Reserve), gives up its lease on the changed budget, and answers with what it consumed
of it; billing commits the change after the answers, and the callers' next leases are granted under it
(a refresh answered across such a change is not used). The stream's first message (at each connect)
asks the book to re-learn every caller. An alert level a budget reached is pushed too: its callers are
refreshed at once; so is a price change (`on_prices`: the meter reloads its price table). No grpc here: the port (`LeasePort`) is the billing client.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from typing import Protocol

import structlog

from services.common.errors import DomainError, PeerUnreachable
from services.common.generation import TrafficClass
from services.common.usage import AlertLevel

log = structlog.get_logger(__name__)
CallerKey = tuple[str, str, tuple[tuple[str, str], ...]]
# A request whose prompt is not yet counted is admitted against a lease with room for this many such
# requests left (`admit(loose=True)`); nearer the edge its prompt is counted first.
LOOSE_ROOM = 64


@dataclass(frozen=True)
class LeaseGrant:
    """One lease as billing answered it."""

    lease_id: str
    budget_id: str
    in_tokens: bool
    granted: int
    expire_in_s: float
    refresh_s: float
    level: AlertLevel = AlertLevel.NONE


@dataclass(frozen=True)
class BudgetChange:
    """A budget change billing pushed: the callers it binds are those of its scope (kind "" binds all)."""

    revision: int
    kind: str = ""  # "", "tenant", "api_key" or "tag"
    tenant_id: str = ""
    api_key_id: str = ""
    tag_key: str = ""
    tag_value: str = ""
    budget_id: str = ""
    ack_wanted: bool = False
    prices_changed: bool = False  # a price was created or deleted: reload the price table

    def binds(self, tenant_id: str, api_key_id: str, tags: dict[str, str]) -> bool:
        if not self.kind:
            return True
        if self.tenant_id and self.tenant_id != tenant_id:
            return False
        if self.kind == "api_key":
            return self.api_key_id == api_key_id
        if self.kind == "tag":
            return tags.get(self.tag_key) == self.tag_value
        return True


class LeasePort(Protocol):
    async def acquire_leases(self, router_id: str, tenant_id: str, api_key_id: str, tags: dict[str, str],
                             consumed: dict[str, int]) -> list[LeaseGrant]: ...

    async def return_lease(self, router_id: str, lease_id: str, consumed: int) -> bool: ...

    def watch_leases(self, router_id: str) -> AsyncIterator[BudgetChange]: ...

    async def ack_lease_change(self, router_id: str, revision: int, consumed: dict[str, int]) -> None: ...


@dataclass
class _Lease:
    lease_id: str
    budget_id: str
    in_tokens: bool
    granted: int
    expire_at: float
    level: AlertLevel
    consumed: int = 0
    last_grant: int = 0  # the room the latest refresh left (for the low-water mark)
    returned: bool = False  # given back (`return_unusable`): nothing more is admitted against it


@dataclass
class _Caller:
    tenant_id: str
    api_key_id: str
    tags: dict[str, str]
    budget_ids: tuple[str, ...] = ()
    known: bool = False  # billing has told which budgets apply
    refresh_at: float = 0.0
    used_at: float = 0.0
    wanted: bool = True  # refresh at the next pass


@dataclass(frozen=True)
class Admitted:
    """A request admitted against leases: what it took of each (to give back what it did not spend)."""

    caller: CallerKey
    lease_ids: tuple[str, ...]
    worst_micros: int
    worst_tokens: int
    level: AlertLevel = AlertLevel.NONE  # the highest its leases carry: billing's latest word on the caller


@dataclass
class LeaseBook:
    port: LeasePort
    router_id: str
    clock: Callable[[], float] = time.monotonic
    min_lifetime_s: float = 20.0
    low_water: float = 0.25
    idle_s: float = 120.0
    default_refresh_s: float = 10.0
    reachable: Callable[[bool], None] | None = None  # told of each refresh's transport outcome (the meter)
    _callers: dict[CallerKey, _Caller] = field(default_factory=dict)
    _leases: dict[str, _Lease] = field(default_factory=dict)  # budget id -> this router's lease on it
    _wake: asyncio.Event = field(default_factory=asyncio.Event)
    _revision: int = 0  # bumped by every change that makes an answer in flight stale
    on_prices: Callable[[], None] | None = None  # told when billing says the prices changed
    watching: bool = False  # billing's change feed is connected (price pushes arrive)

    @staticmethod
    def key(tenant_id: str, api_key_id: str, tags: dict[str, str]) -> CallerKey:
        return tenant_id, api_key_id, tuple(sorted(tags.items()))

    def admit(self, tenant_id: str, api_key_id: str, tags: dict[str, str], traffic: TrafficClass,
              worst_micros: int | None, worst_tokens: int, loose: bool = False) -> Admitted | None:
        """`worst_micros` None: the money cost is not known here (no price yet): only token leases can admit.
        `loose`: the worst case is a looser bound than the request's (its prompt not yet counted): admitted
        only far from every lease's edge (each lease below its first alert level, with room for
        LOOSE_ROOM such requests), so in-flight requests holding a loose bound never crowd out the exact
        ones at a budget's edge; otherwise None, with nothing asked of billing (the caller counts and
        asks again)."""
        key = self.key(tenant_id, api_key_id, tags)
        now = self.clock()
        caller = self._callers.get(key)
        if caller is None:
            self._callers[key] = _Caller(tenant_id, api_key_id, dict(tags), used_at=now)
            self._wake.set()
            return None
        caller.used_at = now
        if not caller.known:
            return None
        leases = [self._leases.get(b) for b in caller.budget_ids]
        if any(lease is None or lease.returned for lease in leases):
            self._want(caller)
            return None
        taken: list[tuple[_Lease, int]] = []
        worst: int | None
        for lease in leases:
            assert lease is not None
            worst = worst_tokens if lease.in_tokens else worst_micros
            if loose and (worst is None or lease.level != AlertLevel.NONE
                          or lease.granted - lease.consumed < LOOSE_ROOM * worst):
                return None
            if worst is None or lease.expire_at - now < self.min_lifetime_s or _refuses(lease.level, traffic) or \
                    lease.consumed + worst > lease.granted:
                self._want(caller)
                return None
            taken.append((lease, worst))
        for lease, worst in taken:
            lease.consumed += worst
            if lease.granted - lease.consumed < lease.last_grant * self.low_water:
                self._want(caller)
        return Admitted(key, tuple(lease.lease_id for lease, _ in taken), worst_micros or 0, worst_tokens,
                        max((lease.level for lease, _ in taken), default=AlertLevel.NONE))

    def finish(self, admitted: Admitted, actual_micros: int, actual_tokens: int) -> None:
        """The request ended: it consumed its actual cost, not its worst case (never more than that)."""
        for lease in self._leases.values():
            if lease.lease_id in admitted.lease_ids:
                worst, actual = ((admitted.worst_tokens, actual_tokens) if lease.in_tokens
                                 else (admitted.worst_micros, actual_micros))
                lease.consumed -= worst - min(actual, worst)

    def no_hard_budget(self, tenant_id: str, api_key_id: str, tags: dict[str, str]) -> bool:
        """Whether billing has told this router that no hard budget applies to the caller (then nothing can
        refuse it); False for a caller the book has not learned yet, or is re-learning after a change."""
        caller = self._callers.get(self.key(tenant_id, api_key_id, tags))
        return caller is not None and caller.known and not caller.budget_ids

    def shortfall(self, tenant_id: str, api_key_id: str, tags: dict[str, str], worst_micros: int | None,
                  worst_tokens: int, traffic: TrafficClass = TrafficClass.INTERACTIVE) -> tuple[str, str] | None:
        """Why the leases cannot admit this request: (budget id, reason) of the first of the caller's hard
        budgets whose lease does not cover it; None when the book does not know the caller or none does."""
        caller = self._callers.get(self.key(tenant_id, api_key_id, tags))
        if caller is None or not caller.known:
            return None
        now = self.clock()
        for budget_id in caller.budget_ids:
            lease = self._leases.get(budget_id)
            if lease is None:
                return budget_id, "this router holds no lease on it"
            worst = worst_tokens if lease.in_tokens else worst_micros
            unit = "tokens" if lease.in_tokens else "micro-units"
            left = lease.expire_at - now
            if worst is None:
                return budget_id, "this router does not know the model's price yet"
            if left <= 0:
                return budget_id, "the lease has expired"
            if left < self.min_lifetime_s:
                return budget_id, f"the lease expires in {left:.0f} s"
            if _refuses(lease.level, traffic):
                return budget_id, f"the budget was last at {lease.level.name}"
            if lease.consumed + worst > lease.granted:
                return budget_id, (f"the lease is used up: {max(lease.granted - lease.consumed, 0)} {unit} left, "
                                   f"the request may cost up to {worst}")
        return None

    async def return_unusable(self, tenant_id: str, api_key_id: str, tags: dict[str, str], worst_micros: int | None,
                              worst_tokens: int) -> bool:
        """Billing refused this request's Reserve: give back the room of the caller's leases that cannot
        cover it (too small, or a price not known here yet; keeping what is consumed), so that room counts for per-request Reserves at the edge instead
        of sitting unused until the lease expires. True when some room went back (a Reserve may fit now)."""
        caller = self._callers.get(self.key(tenant_id, api_key_id, tags))
        if caller is None:
            return False
        given = False
        for budget_id in caller.budget_ids:
            lease = self._leases.get(budget_id)
            worst = None if lease is None else (worst_tokens if lease.in_tokens else worst_micros)
            if lease is None or lease.returned or lease.granted <= lease.consumed or \
                    (worst is not None and lease.consumed + worst <= lease.granted):
                continue  # no room to give, or room that covers it (the refusal is another budget's)
            lease.returned = True
            self._revision += 1
            self._want(caller)
            try:
                given = await self.port.return_lease(self.router_id, lease.lease_id, lease.consumed) or given
            except DomainError as exc:
                log.warning("lease_return_failed", budget_id=budget_id, reason=exc.reason)
        return given

    def leased(self) -> dict[str, tuple[int, int]]:
        """Per budget id: (granted, consumed) of this router's lease, for metrics."""
        return {b: (lease.granted, lease.consumed) for b, lease in self._leases.items()}

    def room(self, budget_id: str) -> int:
        lease = self._leases.get(budget_id)
        return 0 if lease is None else lease.granted - lease.consumed

    def _want(self, caller: _Caller) -> None:
        if not caller.wanted:
            caller.wanted = True
            self._wake.set()

    # --- refresh ----------------------------------------------------------------------------------
    async def refresh_once(self) -> int:
        """Refresh the callers that want it or are due; return the leases of idle ones. Returns how many
        callers were refreshed."""
        now = self.clock()
        refreshed = 0
        for key, caller in list(self._callers.items()):
            if now - caller.used_at > self.idle_s:
                await self._forget(key)
            elif caller.wanted or now >= caller.refresh_at:
                await self._refresh(caller)
                refreshed += 1
        return refreshed

    async def _refresh(self, caller: _Caller) -> None:
        consumed = {lease.lease_id: lease.consumed for b in caller.budget_ids if (lease := self._leases.get(b))}
        caller.wanted = False
        revision = self._revision
        try:
            grants = await self.port.acquire_leases(self.router_id, caller.tenant_id, caller.api_key_id,
                                                    caller.tags, consumed)
        except DomainError as exc:  # billing unreachable or refusing: per-request Reserve decides meanwhile
            log.warning("lease_refresh_failed", tenant=caller.tenant_id, reason=exc.reason)
            caller.refresh_at = self.clock() + min(self.default_refresh_s, 1.0)
            if isinstance(exc, PeerUnreachable) and self.reachable is not None:
                self.reachable(False)
            return
        if self.reachable is not None:
            self.reachable(True)
        if revision != self._revision:  # a budget changed meanwhile: this answer may predate it
            self._want(caller)
            return
        now = self.clock()
        for grant in grants:
            lease = self._leases.get(grant.budget_id)
            if lease is None or lease.lease_id != grant.lease_id:  # new, or the old one expired at billing
                lease = self._leases[grant.budget_id] = _Lease(grant.lease_id, grant.budget_id, grant.in_tokens,
                                                               grant.granted, 0.0, grant.level)
            lease.returned = False  # still open at billing (a return that did not reach it): counted there
            lease.granted = max(lease.granted, grant.granted)
            lease.expire_at, lease.level = now + grant.expire_in_s, grant.level
            lease.last_grant = lease.granted - lease.consumed
        caller.budget_ids = tuple(sorted(g.budget_id for g in grants))
        caller.known = True
        caller.refresh_at = now + min((g.refresh_s for g in grants), default=self.default_refresh_s)

    async def _forget(self, key: CallerKey) -> None:
        caller = self._callers.pop(key)
        still = {b for other in self._callers.values() for b in other.budget_ids}
        for budget_id in caller.budget_ids:
            lease = self._leases.get(budget_id)
            if lease is None or budget_id in still:
                continue
            del self._leases[budget_id]
            try:
                await self.port.return_lease(self.router_id, lease.lease_id, lease.consumed)
            except DomainError as exc:  # it expires at billing anyway
                log.warning("lease_return_failed", budget_id=budget_id, reason=exc.reason)

    async def close(self) -> None:
        """Return every lease (at shutdown): billing keeps only what is still in flight."""
        for key in list(self._callers):
            await self._forget(key)

    # --- budget changes ---------------------------------------------------------------------------
    def change(self, change: BudgetChange, first: bool = False) -> dict[str, int]:
        """Follow a budget change billing pushed (`first`: the first message of a stream, which binds every
        caller): the callers it binds are re-learned (admitted by per-request Reserve until then); when it
        wants an answer, the lease on the changed budget is given up. Returns what was consumed of that
        lease (lease id -> consumed) for the answer."""
        given: dict[str, int] = {}
        if change.prices_changed and self.on_prices is not None:
            self.on_prices()
        if change.prices_changed and not first:
            return given  # a price change only
        if first:
            change = replace(change, kind="")
        if change.ack_wanted or not change.kind:
            self._revision += 1
        for caller in self._callers.values():
            if change.binds(caller.tenant_id, caller.api_key_id, caller.tags):
                if change.ack_wanted or not change.kind:
                    caller.known = False
                self._want(caller)
        lease = self._leases.get(change.budget_id) if change.ack_wanted else None
        if lease is not None:
            lease.returned = True
            given[lease.lease_id] = lease.consumed
            for caller in self._callers.values():
                if change.budget_id in caller.budget_ids:
                    caller.known = False
                    self._want(caller)
        return given

    async def follow_changes(self, retry_s: float = 0.2, max_retry_s: float = 2.0) -> None:
        """Keep billing's WatchLeases stream open (reconnecting) and follow each change it sends."""
        delay = retry_s
        while True:
            first = True
            try:
                async for change in self.port.watch_leases(self.router_id):
                    delay, self.watching = retry_s, True
                    given = self.change(change, first)
                    first = False
                    if change.ack_wanted:
                        try:
                            await self.port.ack_lease_change(self.router_id, change.revision, given)
                        except DomainError as exc:  # billing commits after its deadline anyway
                            log.warning("lease_change_ack_failed", revision=change.revision, reason=exc.reason)
            except DomainError as exc:
                log.warning("lease_watch_failed", reason=exc.reason)
            self.watching = False
            await asyncio.sleep(delay)  # reconnect backoff
            delay = min(delay * 2, max_retry_s)

    async def refresh_forever(self, tick_s: float = 1.0) -> None:
        while True:
            self._wake.clear()
            await self.refresh_once()
            try:
                await asyncio.wait_for(self._wake.wait(), tick_s)
            except TimeoutError:
                pass


def _refuses(level: AlertLevel, traffic: TrafficClass) -> bool:
    cls = TrafficClass.INTERACTIVE if traffic == TrafficClass.UNSPECIFIED else traffic
    return (level >= AlertLevel.EMERGENCY and cls != TrafficClass.CORE) or \
        (level >= AlertLevel.CRITICAL and cls == TrafficClass.BATCH)
