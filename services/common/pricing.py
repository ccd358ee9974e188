"""Prices and the cost of usage, defined once for the mesh: billing charges with this module and the
router quotes with it, so the cost in a stream's last message is exactly what billing records.

- `Price`: a model's (or one version's) price per million tokens in integer micro-units, in force from
  `effective_us` (microseconds since the Unix epoch, UTC) until the next price of the same key.
- `PriceTable.lookup(model, version, at_us)`: the price in force at that time — the (model, version)
  price if one is in force, else the model-wide one (version ""), else None.
- `cost_micros`: (prompt x input + completion x output) / 1,000,000, rounded ONCE on that total, half up;
  cached usage is priced at the cached price for both kinds of tokens when the price has one. No float
  is ever involved.
- `micros_since_epoch`: a `datetime` as the integer microseconds a protobuf Timestamp carries it, which is
  how billing sees the event's end time.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from services.common.errors import FailedPrecondition

MILLION = 1_000_000
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
MICROSECOND = timedelta(microseconds=1)


@dataclass(frozen=True)
class Price:
    price_id: str
    model: str
    model_version: str
    input_per_million: int
    output_per_million: int
    cached_per_million: int | None
    effective_us: int
    currency: str = "USD"


def cost_micros(price: Price, prompt_tokens: int, completion_tokens: int, cached: bool = False) -> int:
    if cached and price.cached_per_million is not None:
        numerator = (prompt_tokens + completion_tokens) * price.cached_per_million
    else:
        numerator = prompt_tokens * price.input_per_million + completion_tokens * price.output_per_million
    return (numerator + MILLION // 2) // MILLION


def micros_since_epoch(at: datetime) -> int:
    """Exact; a naive datetime is taken as UTC, as protobuf's `Timestamp.FromDatetime` takes it."""
    return ((at if at.tzinfo is not None else at.replace(tzinfo=UTC)) - EPOCH) // MICROSECOND


class PriceTable:
    """Prices by (model, version), each list sorted by effective time; lookups pick the one in force.
    A table is immutable: a price change builds a new one."""

    def __init__(self, prices: Iterable[Price] = ()) -> None:
        self._by_key: dict[tuple[str, str], list[Price]] = {}
        for price in sorted(prices, key=lambda p: (p.effective_us, p.price_id)):
            self._by_key.setdefault((price.model, price.model_version), []).append(price)
        self._times = {key: [p.effective_us for p in ps] for key, ps in self._by_key.items()}
        # (model, version) -> [start, end) of the last answer and the price in force there (None: unpriced).
        self._memo: dict[tuple[str, str], tuple[int, int, Price | None]] = {}

    def lookup(self, model: str, version: str, at_us: int) -> Price | None:
        """`in_force`, memoised: the answer is constant between two effective times of the model's prices,
        so repeated lookups inside that interval cost one dict access."""
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

    def charged(self, model: str, version: str, at_us: int, quoted_id: str = "", grace_us: int = 0) -> Price | None:
        """The price an event ending at `at_us` is charged: the one it was quoted with (`quoted_id`) when that
        price was in force for this model and version at some moment of [at_us - grace_us, at_us] — a
        router's table lags a price change by up to its refresh interval, and the caller was answered with
        that quote — otherwise the price in force at `at_us`."""
        in_force = self.lookup(model, version, at_us)
        if not quoted_id or grace_us <= 0 or (in_force is not None and in_force.price_id == quoted_id):
            return in_force
        since = at_us - grace_us
        changes = {t for key in ((model, version), (model, "")) for t in self._times.get(key, ()) if since < t <= at_us}
        for moment in (since, *sorted(changes)):
            then = self.in_force(model, version, moment)
            if then is not None and then.price_id == quoted_id:
                return then
        return in_force

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
