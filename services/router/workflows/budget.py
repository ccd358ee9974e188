"""A workflow's worst case in money (the price billing charges, from the router's price table) and, for
`require_budget`, whether the tenant's budget can hold it now: billing is asked for a hold of the whole
worst case per model, released at once, so the answer is billing's own (hard budgets refuse, soft ones
do not)."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable

from services.common.generation import TrafficClass
from services.common.pricing import PriceTable, cost_micros
from services.router.ports import BillingPort, HoldRequest
from services.router.registry import Registry, split_model
from services.router.types import Money, Principal


class WorkflowBudget:
    def __init__(self, registry: Registry, prices: Callable[[], PriceTable], billing: BillingPort) -> None:
        self._registry = registry
        self._prices = prices  # the table in force (the router reloads it from billing)
        self._billing = billing

    def _version(self, spec: str) -> tuple[str, str]:
        name, pinned = split_model(spec)
        return name, self._registry.pick_version(name, pinned).version

    def quote(self, spec: str, prompt_tokens: int, completion_tokens: int) -> Money | None:
        name, version = self._version(spec)
        price = self._prices().lookup(name, version, time.time_ns() // 1000)
        if price is None:
            return None
        return Money(price.currency, cost_micros(price, prompt_tokens, completion_tokens))

    async def cover(self, principal: Principal, spec: str, prompt_tokens: int, completion_tokens: int,
                    traffic: TrafficClass) -> None:
        """Raises BudgetExceeded unless billing would hold this much for the tenant now."""
        name, version = self._version(spec)
        hold = await self._billing.reserve(HoldRequest(
            request_id=f"workflow-estimate-{uuid.uuid4().hex}", tenant_id=principal.tenant_id,
            api_key_id=principal.key_id, model=name, model_version=version, traffic_class=traffic,
            max_prompt_tokens=prompt_tokens, max_completion_tokens=completion_tokens))
        await self._billing.release(hold.hold_id)
