"""Cost of usage from a price table, in integer micro-units: the price in force at the event's time,
through the mesh's one cost formula and rounding rule (`services.common.pricing`)."""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Iterable

from services.billing.model import Price
from services.common.errors import FailedPrecondition
from services.common.pricing import usage_cost_micros


def cost_micros(price: Price, prompt_tokens: int, completion_tokens: int, cached: bool = False) -> int:
    return usage_cost_micros(prompt_tokens, completion_tokens, price.input_per_million, price.output_per_million,
                             price.cached_per_million, cached)


class PriceTable:
    """Prices by (model, version), each list sorted by effective time; lookups pick the one in force."""

    def __init__(self, prices: Iterable[Price]) -> None:
        self._by_key: dict[tuple[str, str], list[Price]] = {}
        for price in sorted(prices, key=lambda p: (p.effective_us, p.price_id)):
            self._by_key.setdefault((price.model, price.model_version), []).append(price)
        self._times = {key: [p.effective_us for p in ps] for key, ps in self._by_key.items()}
        # (model, version) -> [start, end) of the last answer and the price in force there (None: unpriced).
        self._memo: dict[tuple[str, str], tuple[int, int, Price | None]] = {}

    def lookup(self, model: str, version: str, at_us: int) -> Price | None:
        """`in_force`, memoised: the answer is constant between two effective times of the model's prices,
        so repeated lookups inside that interval cost one dict access. A table is rebuilt on every price
        change (see `catalog`), which invalidates the memo with it."""
        key = (model, version)
        hit = self._memo.get(key)
        if hit is not None and hit[0] <= at_us < hit[1]:
            return hit[2]
        points = sorted({*self._times.get(key, ()), *self._times.get((model, ""), ())})
        index = bisect_right(points, at_us)
        start = points[index - 1] if index > 0 else -(2**63)
        end = points[index] if index < len(points) else 2**63
        price = self.in_force(model, version, at_us)
        self._memo[key] = (start, end, price)
        return price

    def in_force(self, model: str, version: str, at_us: int) -> Price | None:
        for key in ((model, version), (model, "")) if version else ((model, ""),):
            prices = self._by_key.get(key)
            if prices:
                index = bisect_right(self._times[key], at_us)
                if index > 0:
                    return prices[index - 1]
        return None

    def require(self, model: str, version: str, at_us: int) -> Price:
        price = self.lookup(model, version, at_us)
        if price is None:
            known = sorted({m for m, _ in self._by_key})
            hint = f" (priced models: {', '.join(known[:10])})" if known else " (the price table is empty)"
            raise FailedPrecondition(
                f"model {model!r}{' version ' + repr(version) if version else ''} has no price in force at the "
                f"event's time{hint}; add one with `autoglm price set` or CreatePrice",
                reason="UNPRICED_MODEL", field="event.model",
            )
        return price
