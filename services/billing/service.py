"""The billing service's domain facade: async operations over the store, plain dataclasses in and out.

Each operation runs one transactional function of the domain modules through the store (see
`store.base`); side effects outside the database (waking alert watchers, webhooks) happen only after the
commit that made them true.
"""

from __future__ import annotations

import asyncio
import functools
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import replace

import structlog

from services.billing import (
    admin,
    alerts,
    audit,
    budgets,
    bursts,
    engine_usage,
    lease_watch,
    leases,
    ledger,
    metrics,
    reports,
    rollups,
)
from services.billing.catalog import Catalog
from services.billing.config import BillingConfig
from services.billing.model import (
    Alert,
    AuditEvent,
    Budget,
    BudgetState,
    EngineRecord,
    Hold,
    Lease,
    LeaseRequest,
    Recorded,
    ReserveRequest,
    Thresholds,
    UsageEvent,
    Verdict,
)
from services.billing.store.base import Store, Tx
from services.billing.validation import check_event, check_tags, check_text, check_tokens
from services.billing.webhooks import WebhookPolicy, WebhookSender
from services.common.errors import BudgetExceeded, DomainError, FailedPrecondition, InvalidInput
from services.common.generation import TrafficClass
from services.common.pricing import Price, cost_micros

log = structlog.get_logger(__name__)
Clock = Callable[[], int]


MAX_ENGINE_RECORDS = 1000
# The roller adds events to the burst table once they span this much recorded time (bursts.keep).
BURST_BATCH_US = 5_000_000


def wall_clock() -> int:
    return time.time_ns() // 1000


class Billing:
    def __init__(self, store: Store, config: BillingConfig, clock: Clock = wall_clock,
                 webhooks: WebhookSender | None = None) -> None:
        self.store = store
        self.config = config
        self.clock = clock
        self.catalog = Catalog()
        self.fired = alerts.FiredCache()
        self.ingester = ledger.Ingester(self.catalog, self.fired, config.currency,
                                       quote_grace_us=int(config.quote_grace_s * 1_000_000))
        self.hub = alerts.AlertHub()
        self.webhooks = webhooks or WebhookSender(
            WebhookPolicy(config.webhook_allow), config.webhook_attempts, config.webhook_backoff_s,
            config.webhook_timeout_s, config.webhook_connect_timeout_s, config.webhook_max_response_bytes)
        self.default_thresholds = Thresholds(config.warning_percent, config.critical_percent,
                                             config.emergency_percent)
        self.lease_policy = leases.LeasePolicy(config.lease_ttl_s, config.lease_refresh_s,
                                               config.lease_floor_permille, config.lease_cap_permille,
                                               config.lease_edge_permille)
        self.anomaly_rule = reports.AnomalyRule(config.anomaly_max_requests, config.anomaly_window_s,
                                                config.anomaly_hourly_factor_permille)
        self._burst_tails = bursts.Tails()  # each key's latest end times, between the roller's burst steps
        # Budget changes pushed to the routers' lease books before they commit (lease_watch.py).
        self.lease_watchers = lease_watch.Watchers(config.lease_change_timeout_s)
        self._settles: _Settles | None = None  # the settles waiting for the writer (folded into one unit)
        self._settling: set[asyncio.Task[None]] = set()

    async def close(self) -> None:
        await self.webhooks.close()
        await self.store.close()

    # --- usage --------------------------------------------------------------------------------
    def _prepare(self, event: UsageEvent, now: int, prefix: str = "event") -> UsageEvent:
        if not event.end_us:
            event = replace(event, end_us=now)
        check_event(event, now, self.config.max_future_skew_s, prefix)
        return event

    async def record(self, event: UsageEvent) -> Recorded:
        now = self.clock()
        try:
            event = self._prepare(event, now)
        except DomainError:
            metrics.EVENTS.labels("rejected").inc()
            raise
        ingested = await self.store.write(lambda tx: self.ingester.ingest(tx, [event], now))
        self._after_commit(ingested)
        await self._note_late(ingested.outcomes)
        return ingested.single()

    async def record_many(self, events: Sequence[UsageEvent]) -> list[Recorded | DomainError]:
        """Record a batch in one transaction (one durable commit); each event is accepted or rejected on its own."""
        now = self.clock()
        outcomes: list[Recorded | DomainError | None] = [None] * len(events)
        prepared: list[UsageEvent] = []
        slots: list[int] = []
        for index, event in enumerate(events):
            try:
                prepared.append(self._prepare(event, now))
                slots.append(index)
            except DomainError as error:
                outcomes[index] = error
                metrics.EVENTS.labels("rejected").inc()
        if prepared:
            ingested = await self.store.write(lambda tx: self.ingester.ingest(tx, prepared, now))
            for index, outcome in zip(slots, ingested.outcomes, strict=True):
                outcomes[index] = outcome
            self._after_commit(ingested)
            await self._note_late(ingested.outcomes)
        return [o for o in outcomes if o is not None]

    async def _note_late(self, outcomes: Sequence[Recorded | DomainError]) -> None:
        """Count (and log) router events that came after their request was billed from an engine record."""
        duplicates = [o.event_id for o in outcomes if isinstance(o, Recorded) and o.duplicate]
        if not duplicates:
            return
        late = await self.store.read(lambda tx: engine_usage.billed_by_engine(tx, duplicates))
        if late:
            metrics.ENGINE_RECORDS.labels("late_router").inc(len(late))
            log.warning("router_event_after_engine_bill", count=len(late), event_ids=sorted(late)[:10])

    def _after_commit(self, ingested: ledger.Ingested) -> None:
        metrics.observe_events(ingested.outcomes, ingested.new, self.config.currency)
        metrics.observe_budgets(ingested.states, with_room=False)
        raised = ingested.alerts
        if not raised:
            return
        self.hub.notify()
        for alert in raised:
            log.info("budget_alert", budget_id=alert.budget_id, level=alert.level.name, permille=alert.permille)
            moved = self.catalog.cached_budget(alert.budget_id)
            if moved is not None:  # the routers re-acquire the leases, which carry the level
                self.lease_watchers.notify(moved.scope, moved.budget_id)
        for alert in raised:
            budget = self.catalog.cached_budget(alert.budget_id)
            if budget is not None and budget.webhook_url:
                self.webhooks.send(budget.webhook_url, alert_payload(alert))

    # --- holds ----------------------------------------------------------------------------------
    async def reserve(self, req: ReserveRequest, actor: str = "") -> Hold:
        check_text(req.tenant_id, "tenant_id", required=True)
        check_text(req.model, "model", required=True)
        check_text(req.request_id, "request_id", required=False, limit=128)
        check_tokens(req.max_prompt_tokens, "max_prompt_tokens")
        check_tokens(req.max_completion_tokens, "max_completion_tokens")
        check_tags(req.tags, "tags")
        if not 0 <= req.ttl_s <= self.config.max_hold_ttl_s:
            raise InvalidInput(f"ttl_seconds must be 0 (default {self.config.hold_ttl_s}) to "
                               f"{self.config.max_hold_ttl_s}", field="ttl_seconds")
        ttl = req.ttl_s or self.config.hold_ttl_s
        now = self.clock()

        def unit(tx: Tx) -> Hold | budgets.Denied:
            snap = self.catalog.current(tx)
            price = snap.prices.require(req.model, req.model_version, now)
            amount = cost_micros(price, req.max_prompt_tokens, req.max_completion_tokens)
            return budgets.reserve(tx, snap, req, amount, now, ttl, actor)

        outcome = await self.store.write(unit)
        if isinstance(outcome, budgets.Denied):
            raise BudgetExceeded(outcome.reason, field="budget", metadata={"budget_id": outcome.budget_id,
                                                                           "level": outcome.level.name})
        return outcome

    async def settle(self, hold_id: str, event: UsageEvent) -> Recorded:
        """Record a request's usage and close its hold, in one commit. Settles that arrive while the writer is
        busy are folded into one unit of work (`_Settles`): one ingest of all their events, as StreamUsage
        batches, and each hold closed; each caller still gets its own result or error."""
        check_text(hold_id, "hold_id", required=True, limit=128)
        event = self._prepare(event, self.clock())
        waiting = self._settles
        place = waiting.add(hold_id, event) if waiting is not None else -1
        if waiting is None or place < 0:
            waiting = self._settles = _Settles()
            place = waiting.add(hold_id, event)
            self._settling.add(asyncio.ensure_future(self._run_settles(waiting)))
        result = (await asyncio.shield(waiting.done))[place]
        if isinstance(result, BaseException):
            raise result
        return result

    async def _run_settles(self, waiting: _Settles) -> None:
        ingested: list[ledger.Ingested] = []
        try:
            try:
                results, ingested = await self.store.write(lambda tx: self._settle_all(tx, waiting.take()))
            except Exception:  # one settle broke the unit (logged by the store): each on its own, to say which
                results, ingested = [], []
                for item in waiting.take():
                    try:
                        one, single = await self.store.write(functools.partial(self._settle_all, items=[item]))
                    except Exception as error:
                        one, single = [error], []
                    results += one
                    ingested += single
            for each in ingested:
                self._after_commit(each)
            waiting.done.set_result(results)
        except BaseException as error:  # the callers get it
            if not waiting.done.done():
                if isinstance(error, Exception):
                    waiting.done.set_exception(error)
                else:
                    waiting.done.cancel()
            if not isinstance(error, Exception):
                raise
            return
        finally:
            self._settling.discard(asyncio.current_task())  # type: ignore[arg-type]
        for each in ingested:
            try:
                await self._note_late(each.outcomes)
            except Exception:  # only a log line and a metric: the settles are answered
                log.exception("late_router_event_check_failed")

    def _settle_all(self, tx: Tx, items: Sequence[tuple[str, UsageEvent]]
                    ) -> tuple[list[Recorded | Exception], list[ledger.Ingested]]:
        """Settle these holds with their events in the caller's transaction: the events ingested at once
        and each hold closed whose event was recorded; a hold of another tenant or an unpriced event is that
        settle's error, and its hold stays open with nothing written for it."""
        now = self.clock()
        results: list[Recorded | Exception | None] = [None] * len(items)
        kept: list[int] = []
        for index, (hold_id, event) in enumerate(items):
            try:
                budgets.check_settle_tenant(tx, hold_id, event.tenant_id)
                kept.append(index)
            except DomainError as error:
                results[index] = error
        if not kept:
            return [r for r in results if r is not None], []
        budgets.lock_holds(tx, [items[i][0] for i in kept])
        ingested = self.ingester.ingest(tx, [items[i][1] for i in kept], now)
        snap = self.catalog.current(tx)
        for index, outcome in zip(kept, ingested.outcomes, strict=True):
            results[index] = outcome
            if not isinstance(outcome, DomainError):
                budgets.close_hold(tx, snap, items[index][0], budgets.SETTLED, now)
        return [r for r in results if r is not None], [ingested]

    async def release(self, hold_id: str) -> bool:
        check_text(hold_id, "hold_id", required=True, limit=128)
        now = self.clock()

        def unit(tx: Tx) -> bool:
            budgets.hold_tenant(tx, hold_id)
            return budgets.close_hold(tx, self.catalog.current(tx), hold_id, budgets.RELEASED, now)

        return await self.store.write(unit)

    # --- leases ---------------------------------------------------------------------------------
    async def acquire_leases(self, req: LeaseRequest) -> list[Lease]:
        check_text(req.router_id, "router_id", required=True, limit=128)
        check_text(req.tenant_id, "tenant_id", required=True)
        check_tags(req.tags, "tags")
        for lease_id, consumed in req.consumed.items():
            check_text(lease_id, "consumed.lease_id", required=True, limit=128)
            if consumed < 0:
                raise InvalidInput(f"consumed of lease {lease_id} is {consumed}; it cannot be negative",
                                   field="consumed.consumed")
        now = self.clock()
        states: list[BudgetState] = []
        async with self.lease_watchers.acquiring():  # never amid a budget change (lease_watch.py)
            granted = await self.store.write(lambda tx: leases.acquire(tx, self.catalog.current(tx),
                                                                       self.lease_policy, req, now, states))
        metrics.LEASES.labels("acquire").inc()
        metrics.observe_budgets(states)
        return granted

    async def return_lease(self, lease_id: str, router_id: str, consumed: int) -> bool:
        check_text(lease_id, "lease_id", required=True, limit=128)
        check_text(router_id, "router_id", required=True, limit=128)
        if consumed < 0:
            raise InvalidInput(f"consumed is {consumed}; it cannot be negative", field="consumed")
        now = self.clock()
        returned = await self.store.write(lambda tx: leases.return_lease(tx, lease_id, router_id, consumed, now))
        metrics.LEASES.labels("return").inc()
        return returned

    async def watch_leases(self, router_id: str) -> AsyncIterator[lease_watch.LeaseChange]:
        """A router's feed of budget changes (lease_watch.py), until it hangs up."""
        check_text(router_id, "router_id", required=True, limit=128)
        handle, watcher = self.lease_watchers.subscribe(router_id)
        try:
            while True:
                yield await watcher.queue.get()
        finally:
            self.lease_watchers.unsubscribe(handle)

    def ack_lease_change(self, router_id: str, revision: int, consumed: dict[str, int]) -> None:
        check_text(router_id, "router_id", required=True, limit=128)
        for lease_id, used in consumed.items():
            check_text(lease_id, "consumed.lease_id", required=True, limit=128)
            if used < 0:
                raise InvalidInput(f"consumed of lease {lease_id} is {used}; it cannot be negative",
                                   field="consumed.consumed")
        if not self.lease_watchers.ack(router_id, revision, consumed):
            log.info("lease_change_ack_late", router_id=router_id, revision=revision)

    async def check(self, tenant_id: str, api_key_id: str, tags: dict[str, str], traffic_class: int) -> Verdict:
        check_text(tenant_id, "tenant_id", required=True)
        check_tags(tags, "tags")
        now = self.clock()
        verdict = await self.store.read_current(lambda tx: budgets.check(
            tx, self.catalog.current(tx), tenant_id, api_key_id, tags, TrafficClass(traffic_class), now))
        metrics.observe_budgets(verdict.states)
        return verdict

    async def purge_expired_holds(self) -> int:
        now = self.clock()
        def unit(tx: Tx) -> int:
            leases.purge_expired(tx, now)
            return tx.execute("DELETE FROM hold_budgets WHERE expire_us <= ?", (now,))

        return await self.store.write(unit)

    # --- engine records ----------------------------------------------------------------------------
    async def report_engine_usage(self, records: Sequence[EngineRecord]) -> list[DomainError | None]:
        """Keep a replica's batch of records in one commit; one outcome per record (None: kept)."""
        if len(records) > MAX_ENGINE_RECORDS:
            raise InvalidInput(f"records has {len(records)} entries; at most {MAX_ENGINE_RECORDS} per call",
                               field="records")
        now = self.clock()
        outcomes: list[DomainError | None] = []
        kept: list[EngineRecord] = []
        for index, record in enumerate(records):
            prefix = f"records[{index}]"
            try:
                check_text(record.request_id, f"{prefix}.request_id", required=True, limit=128)
                check_text(record.replica_id, f"{prefix}.replica_id", required=True, limit=128)
                check_text(record.router_id, f"{prefix}.router_id", required=False, limit=128)
                check_event(engine_usage.event_of(record), now, self.config.max_future_skew_s, prefix)
            except DomainError as error:
                outcomes.append(error)
                continue
            outcomes.append(None)
            kept.append(replace(record, end_us=record.end_us or now))
        grace = int(self.config.engine_grace_s * 1_000_000)
        if kept:
            await self.store.write(lambda tx: engine_usage.store(tx, kept, now, grace))
        metrics.ENGINE_RECORDS.labels("received").inc(len(kept))
        if len(kept) < len(records):
            metrics.ENGINE_RECORDS.labels("rejected").inc(len(records) - len(kept))
        return outcomes

    async def reconcile_engine_usage(self) -> engine_usage.Reconciled:
        """Bill the due engine records no router event came for; mark the others matched."""
        now = self.clock()
        result = await self.store.write(lambda tx: engine_usage.reconcile(tx, self.ingester, now))
        if result.ingested is not None:
            self._after_commit(result.ingested)
        for outcome, count in (("matched", len(result.matched)), ("billed", len(result.billed)),
                               ("superseded", result.superseded), ("rejected", len(result.rejected)),
                               ("refused", len(result.refused))):
            if count:
                metrics.ENGINE_RECORDS.labels(outcome).inc(count)
        if result.billed:
            log.info("engine_records_billed", count=len(result.billed), request_ids=result.billed[:10])
        for request_id, error in result.rejected:
            log.error("engine_record_unbillable", request_id=request_id, reason=error.reason, message=error.message)
        return result

    async def purge_engine_records(self) -> int:
        before = self.clock() - self.config.engine_retention_s * 1_000_000
        return await self.store.write(lambda tx: engine_usage.purge(tx, before))

    # --- prices -----------------------------------------------------------------------------------
    async def create_price(self, price: Price, actor: str, claimed: str = "") -> Price:
        admin.check_price(price, self.config.currency)
        now = self.clock()
        created = await self.store.write(lambda tx: admin.create_price(tx, price, actor, now, claimed))
        self.lease_watchers.prices_changed()
        return created

    async def list_prices(self, model: str) -> list[Price]:
        return await self.store.read(lambda tx: admin.list_prices(tx, model))

    async def delete_price(self, price_id: str, actor: str, claimed: str = "") -> None:
        check_text(price_id, "price_id", required=True)
        now = self.clock()
        await self.store.write(lambda tx: admin.delete_price(tx, price_id, actor, now, claimed))
        self.lease_watchers.prices_changed()

    # --- budgets ----------------------------------------------------------------------------------
    async def create_budget(self, budget: Budget, actor: str, currency: str = "", claimed: str = "") -> Budget:
        budget = replace(budget, thresholds=admin.with_default_thresholds(budget.thresholds, self.default_thresholds))
        budget = admin.check_budget(budget, self.config.currency, currency)
        check_text(budget.budget_id, "budget.budget_id", required=False, limit=64)
        if budget.webhook_url:
            await self.webhooks.policy.check(budget.webhook_url)
        async with self.lease_watchers.changing(budget.scope):
            now = self.clock()
            return await self.store.write(lambda tx: admin.create_budget(tx, budget, actor, now, claimed))

    async def update_budget(self, changes: Budget, actor: str, currency: str = "", claimed: str = "") -> Budget:
        check_text(changes.budget_id, "budget.budget_id", required=True)
        now = self.clock()
        current = await self.store.read(lambda tx: admin.get_budget(tx, changes.budget_id))
        scope_changed = bool(changes.scope.kind) and changes.scope != current.scope
        if scope_changed or (bool(changes.period.kind) and changes.period != current.period):
            raise FailedPrecondition("a budget's scope and period cannot change; create a new budget instead",
                                     field="budget.scope")
        merged = replace(changes, scope=current.scope, period=current.period,
                         thresholds=admin.with_default_thresholds(changes.thresholds, self.default_thresholds))
        merged = admin.check_budget(merged, self.config.currency, currency)
        if merged.webhook_url and merged.webhook_url != current.webhook_url:
            await self.webhooks.policy.check(merged.webhook_url)
        async with self.lease_watchers.changing(current.scope, current.budget_id) as reported:
            now = self.clock()

            def unit(tx: Tx) -> Budget:
                updated = admin.update_budget(tx, merged, actor, now, claimed)
                leases.give_up(tx, reported, now)
                return updated

            return await self.store.write(unit)

    async def delete_budget(self, budget_id: str, actor: str, claimed: str = "") -> None:
        check_text(budget_id, "budget_id", required=True)
        now = self.clock()
        old = await self.store.read(lambda tx: admin.get_budget(tx, budget_id))
        async with self.lease_watchers.changing(old.scope, budget_id) as reported:
            now = self.clock()

            def unit(tx: Tx) -> None:
                admin.delete_budget(tx, budget_id, actor, now, claimed)
                leases.give_up(tx, reported, now)

            await self.store.write(unit)
        metrics.forget_budget(budget_id, old.scope.tenant_id)

    async def budget_state(self, budget_id: str) -> BudgetState:
        check_text(budget_id, "budget_id", required=True)
        now = self.clock()
        state = await self.store.read(lambda tx: alerts.with_fired(
            tx, budgets.state(tx, admin.get_budget(tx, budget_id), now, now)))
        metrics.observe_budgets([state])
        return state

    async def list_budget_states(self, tenant_id: str) -> list[BudgetState]:
        now = self.clock()

        def unit(tx: Tx) -> list[BudgetState]:
            snap = self.catalog.current(tx)
            chosen = [b for b in snap.budgets.values() if not tenant_id or b.scope.tenant_id == tenant_id]
            return [alerts.with_fired(tx, budgets.state(tx, b, now, now))
                    for b in sorted(chosen, key=lambda b: b.budget_id)]

        return await self.store.read(unit)

    # --- alerts, reports, audit ---------------------------------------------------------------------
    async def watch_alerts(self, cursor: str, tenant_id: str, poll_s: float = 1.0) -> AsyncIterator[Alert]:
        position = alerts.parse_cursor(cursor) if cursor else await self.store.read(alerts.last_seq)
        while True:
            seen = self.hub.version
            batch = await self.store.read(functools.partial(alerts.after, cursor=position, tenant_id=tenant_id))
            for alert in batch:
                position = alert.seq
                yield alert
            if not batch:
                await self.hub.wait(seen, poll_s)

    async def roll_rollups(self) -> int:
        """Roll the events recorded since the last roll into the hourly rollups; returns the seqs it moved.
        The events are summed on a read snapshot, beside the writer, which only folds the sums in; the burst
        table's step (or its rebuild for a new rule) is computed on a read snapshot too, from each key's
        latest end times kept since the last step (`bursts.Tails`), and written on its own."""
        rule = (self.anomaly_rule.max_requests, self.anomaly_rule.window_s)
        grouped = await self.store.read(rollups.group)
        moved = await self.store.write(lambda tx: rollups.roll(tx, with_bursts=False, grouped=grouped))
        tails = self._burst_tails
        step = await self.store.read(lambda tx: bursts.step(tx, rollups.mark(tx), BURST_BATCH_US, rule, tails))
        if step is not None and await self.store.write(lambda tx: bursts.apply(tx, step)):
            tails.adopt(step)
        return moved

    async def report(self, query: reports.ReportQuery) -> tuple[list[reports.ReportRow], reports.ReportRow]:
        reports.check_query(query)
        return await self.store.read(lambda tx: reports.build(tx, query, self.anomaly_rule))

    async def audit_events(self, start_us: int, end_us: int, action: str, page_size: int,
                           page_token: str) -> tuple[list[AuditEvent], str]:
        return await self.store.read(lambda tx: audit.list_events(tx, start_us, end_us, action, page_size,
                                                                  page_token))

    async def totals(self) -> tuple[int, int, int, int]:
        return await self.store.read(ledger.totals)


class _Settles:
    """Settles waiting to be folded into one unit of work: open until the writer starts running it (`take`),
    then closed (later settles start the next one). `add` is called on the event loop, `take` by the
    store's writer thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._items: list[tuple[str, UsageEvent]] = []
        self._taken = False
        self.done: asyncio.Future[list[Recorded | Exception]] = asyncio.get_running_loop().create_future()

    def add(self, hold_id: str, event: UsageEvent) -> int:
        """This settle's place among the results, or -1 when the writer already took the batch."""
        with self._lock:
            if self._taken:
                return -1
            self._items.append((hold_id, event))
            return len(self._items) - 1

    def take(self) -> list[tuple[str, UsageEvent]]:
        with self._lock:
            self._taken = True
            return list(self._items)


def alert_payload(alert: Alert) -> dict[str, object]:
    return {"cursor": str(alert.seq), "budget_id": alert.budget_id, "tenant_id": alert.tenant_id,
            "scope": alert.scope.describe(), "level": alert.level.name, "utilization_permille": alert.permille,
            "period_start_us": alert.period_start_us, "raise_time_us": alert.raise_us}


async def run_engine_reconciler(billing: Billing) -> None:
    """Reconcile due engine records every `engine_reconcile_s`; purge old settled ones hourly."""
    every = billing.config.engine_reconcile_s
    last_purge = time.monotonic()
    while True:
        await asyncio.sleep(every)
        try:
            while (await billing.reconcile_engine_usage()).requests >= 1000:
                pass  # a backlog: go on at once
            if time.monotonic() - last_purge > 3600:
                last_purge = time.monotonic()
                await billing.purge_engine_records()
        except Exception:  # keep the reconciler alive; the error is logged
            log.exception("engine_reconcile_failed")


async def run_rollup_roller(billing: Billing, every_s: float = 1.0) -> None:
    """Roll the events recorded since the last roll into the hourly rollups every `every_s` (reports stay
    exact without it: they read the events not rolled yet; it keeps those few)."""
    while True:
        try:
            while await billing.roll_rollups() >= rollups.ROLL_LIMIT:
                pass  # a backlog: go on at once
        except Exception:  # keep the roller alive; the error is logged
            log.exception("rollup_roll_failed")
        await asyncio.sleep(every_s)


async def run_hold_janitor(billing: Billing, every_s: float = 60.0) -> None:
    """Drop expired holds' rows now and then (they already stopped counting when they expired)."""
    while True:
        await asyncio.sleep(every_s)
        try:
            await billing.purge_expired_holds()
        except Exception:  # keep the janitor alive; the error is logged
            log.exception("hold_purge_failed")
