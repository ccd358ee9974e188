"""The billing price table, mirrored in the router so a request's cost is known the moment it ends.

Billing prices an event with the price in force at the event's end time: the (model, version) price if
there is one, else the model-wide price; cost = (prompt x input + completion x output) / 1,000,000
micro-units, rounded once, half up; cached events use the cached price for all tokens when the model has
one (services/billing/pricing.py). The same integer formula here gives the same cost, so the router can
answer with the cost and settle with billing after the last message. The table is refreshed from billing's
ListPrices periodically; billing's own answer stays the ledger's truth (a mismatch is logged and triggers
a refresh).
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from services.common.pricing import usage_cost_micros
from services.router.types import Money

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
MICROSECOND = timedelta(microseconds=1)


@dataclass(frozen=True)
class Price:
    model: str
    model_version: str
    input_per_million: int
    output_per_million: int
    cached_per_million: int | None
    effective_us: int
    currency_code: str = "USD"


def cost_micros(price: Price, prompt_tokens: int, completion_tokens: int, cached: bool = False) -> int:
    return usage_cost_micros(prompt_tokens, completion_tokens, price.input_per_million, price.output_per_million,
                             price.cached_per_million, cached)


class PriceBook:
    def __init__(self, prices: Iterable[Price] = ()) -> None:
        self.replace(prices)

    def replace(self, prices: Iterable[Price]) -> None:
        by_key: dict[tuple[str, str], list[Price]] = {}
        for price in sorted(prices, key=lambda p: p.effective_us):
            by_key.setdefault((price.model, price.model_version), []).append(price)
        self._by_key = by_key
        self._times = {key: [p.effective_us for p in ps] for key, ps in by_key.items()}

    def in_force(self, model: str, version: str, at: datetime) -> Price | None:
        at_us = (at - EPOCH) // MICROSECOND  # exact, as billing converts the event's Timestamp
        for key in ((model, version), (model, "")) if version else ((model, ""),):
            prices = self._by_key.get(key)
            if prices:
                index = bisect_right(self._times[key], at_us)
                if index > 0:
                    return prices[index - 1]
        return None

    def cost(self, model: str, version: str, at: datetime, prompt_tokens: int, completion_tokens: int,
             cached: bool) -> Money | None:
        """The cost billing will compute, or None when no price is known locally."""
        price = self.in_force(model, version, at)
        if price is None:
            return None
        return Money(price.currency_code, cost_micros(price, prompt_tokens, completion_tokens, cached))
