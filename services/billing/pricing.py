"""Cost of usage from a price table, in integer micro-units.

Rounding rule: the exact cost is (prompt x input_price + completion x output_price) / 1,000,000 micro-units
(prices are per million tokens); it is rounded ONCE, on that total, half up (x.5 micro-units → x+1). Cached
events use the cached price for both kinds of tokens when the model has one. No float is ever involved.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Iterable

from services.billing.model import Price
from services.common.errors import FailedPrecondition

MILLION = 1_000_000


def cost_micros(price: Price, prompt_tokens: int, completion_tokens: int, cached: bool = False) -> int:
    if cached and price.cached_per_million is not None:
        numerator = (prompt_tokens + completion_tokens) * price.cached_per_million
    else:
        numerator = prompt_tokens * price.input_per_million + completion_tokens * price.output_per_million
    return (numerator + MILLION // 2) // MILLION


class PriceTable:
    """Prices by (model, version), each list sorted by effective time; lookups pick the one in force."""

    def __init__(self, prices: Iterable[Price]) -> None:
        self._by_key: dict[tuple[str, str], list[Price]] = {}
        for price in sorted(prices, key=lambda p: (p.effective_us, p.price_id)):
            self._by_key.setdefault((price.model, price.model_version), []).append(price)
        self._times = {key: [p.effective_us for p in ps] for key, ps in self._by_key.items()}

    def in_force(self, model: str, version: str, at_us: int) -> Price | None:
        for key in ((model, version), (model, "")) if version else ((model, ""),):
            prices = self._by_key.get(key)
            if prices:
                index = bisect_right(self._times[key], at_us)
                if index > 0:
                    return prices[index - 1]
        return None

    def require(self, model: str, version: str, at_us: int) -> Price:
        price = self.in_force(model, version, at_us)
        if price is None:
            known = sorted({m for m, _ in self._by_key})
            hint = f" (priced models: {', '.join(known[:10])})" if known else " (the price table is empty)"
            raise FailedPrecondition(
                f"model {model!r}{' version ' + repr(version) if version else ''} has no price in force at the "
                f"event's time{hint}; add one with `autoglm price set` or CreatePrice",
                reason="UNPRICED_MODEL", field="event.model",
            )
        return price
