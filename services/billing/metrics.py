"""Billing's Prometheus metrics, in the default registry (served on `--metrics-port` by the shared endpoint).

- `autoglm_billing_spend_micros_total{tenant,currency}`: cost of newly recorded events, in micro-units;
- `autoglm_billing_events_total{result}`: usage events by result: recorded, duplicate (an id seen before:
  nothing written) or rejected (bad input, unpriced model);
- `autoglm_billing_budget_utilization_permille{budget_id,tenant}`: spend / limit of the current period, per mille;
- `autoglm_billing_budget_alert_level{budget_id,tenant}`: 0 none, 1 warning, 2 critical, 3 emergency;
- `autoglm_billing_lease_calls_total{op}`: router lease calls (acquire, return) that billing answered;
- `autoglm_billing_engine_records_total{outcome}`: inference replicas' records of finished sequences:
  received, matched (the router's event came), billed (no router event: billed from the record),
  superseded (another record of the request was billed), rejected, refused (billing had refused the
  request's hold: never billed), and late_router (a router event that
  came after its request was billed from a record: answered as a duplicate, not counted again).
- `autoglm_billing_budget_held{budget_id,tenant}` and `autoglm_billing_budget_leased{budget_id,tenant}`: open
  holds and the unused room of every router's leases, in the budget's unit (micro-units or tokens), as of
  the latest check, reserve, lease grant or budget read (an event's commit does not recount them).

Updated after the commit that made them true, from what the ledger already computed (no extra queries).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

from prometheus_client import Counter, Gauge

from services.billing.model import BudgetState, Recorded, UsageEvent
from services.common.errors import DomainError

SPEND = Counter("autoglm_billing_spend_micros", "Cost of recorded usage, in micro-units of the currency",
                ["tenant", "currency"])
EVENTS = Counter("autoglm_billing_events", "Usage events by result: recorded, duplicate or rejected", ["result"])
LEASES = Counter("autoglm_billing_lease_calls", "Router lease calls answered: acquire or return", ["op"])
ENGINE_RECORDS = Counter("autoglm_billing_engine_records",
                         "Inference replicas' usage records by outcome: received, matched, billed, superseded, "
                         "refused, rejected, late_router", ["outcome"])
UTILIZATION = Gauge("autoglm_billing_budget_utilization_permille",
                    "Spend of the budget's current period over its limit, per mille", ["budget_id", "tenant"])
LEVEL = Gauge("autoglm_billing_budget_alert_level",
              "Alert level of the budget's current period: 0 none, 1 warning, 2 critical, 3 emergency",
              ["budget_id", "tenant"])

HELD = Gauge("autoglm_billing_budget_held", "Open holds on the budget, in its unit (micro-units or tokens)",
             ["budget_id", "tenant"])
LEASED = Gauge("autoglm_billing_budget_leased",
               "Unused room of every router's leases on the budget, in its unit (micro-units or tokens)",
               ["budget_id", "tenant"])


def observe_events(outcomes: Iterable[Recorded | DomainError], new: Iterable[tuple[UsageEvent, int]],
                   currency: str) -> None:
    counts = {"recorded": 0, "duplicate": 0, "rejected": 0}
    for outcome in outcomes:
        if isinstance(outcome, DomainError):
            counts["rejected"] += 1
        else:
            counts["duplicate" if outcome.duplicate else "recorded"] += 1
    for result, count in counts.items():
        if count:
            EVENTS.labels(result).inc(count)
    spend: dict[str, int] = defaultdict(int)
    for event, cost in new:
        spend[event.tenant_id] += cost
    for tenant, micros in spend.items():
        SPEND.labels(tenant, currency).inc(micros)


def observe_budgets(states: Iterable[BudgetState], with_room: bool = True) -> None:
    """`with_room` False: the states count spend only (an event's commit), so held and leased are left."""
    for st in states:
        labels = (st.budget.budget_id, st.budget.scope.tenant_id)
        UTILIZATION.labels(*labels).set(st.permille)
        LEVEL.labels(*labels).set(int(st.level))
        if with_room:
            HELD.labels(*labels).set(st.held)
            LEASED.labels(*labels).set(st.leased)


def forget_budget(budget_id: str, tenant_id: str) -> None:
    for gauge in (UTILIZATION, LEVEL, HELD, LEASED):
        try:
            gauge.remove(budget_id, tenant_id)
        except KeyError:
            pass
