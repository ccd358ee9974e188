"""The router quotes exactly what billing charges, to the micro-unit.

Random price schedules (model-wide and per version, with and without a cached price, taking effect
before or after the usage) and random usage (tokens, version, end time to the microsecond, cached or
not) go through the real code on both sides: billing stores the prices and answers ListPrices with its
conversion; the router reads that reply (as bytes off the wire) into its meter and quotes the usage; the
router's usage event, as it is sent, is priced by billing's ledger on a real (in-memory) SQLite database.
"""

from __future__ import annotations

import asyncio
import itertools
from datetime import UTC, datetime, timedelta
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from autoglm.billing.v1 import billing_service_pb2 as billing_pb2
from services.billing import admin, convert
from services.billing.admin import MAX_PRICE
from services.billing.validation import MAX_TOKENS
from services.common.errors import FailedPrecondition
from services.common.generation import TrafficClass
from services.common.price_convert import price_from_proto, price_to_proto
from services.common.pricing import EPOCH, Price
from services.common.usage import UsageStatus
from services.router.billing_client import usage_to_proto
from services.router.metering import Meter
from services.router.ports import UsageRecord
from services.router.spool import UsageSpool
from tests.unit.billing.fakes import T0, Ledger

HOUR_US = 3600 * 1_000_000
MODELS = (f"model-{n}" for n in itertools.count())

amounts = st.one_of(st.integers(0, MAX_PRICE), st.integers(0, 10_000_000))  # huge, and typical
schedule = st.lists(
    st.tuples(st.sampled_from(["", "v1"]), st.integers(-HOUR_US, HOUR_US), amounts, amounts,
              st.none() | amounts),
    max_size=5, unique_by=lambda p: (p[0], p[1]))
usage = st.tuples(st.sampled_from(["", "v1", "v2"]), st.integers(-HOUR_US, HOUR_US), st.integers(0, MAX_TOKENS),
                  st.integers(0, MAX_TOKENS), st.booleans())


class BillingPrices:
    """The part of billing the router's meter reads prices from: ListPrices, through the wire format."""

    def __init__(self, ledger: Ledger, model: str) -> None:
        self._ledger, self._model = ledger, model

    async def list_prices(self) -> list[Price]:
        reply = billing_pb2.ListPricesResponse(
            prices=[price_to_proto(p) for p in admin.list_prices(self._ledger.tx, self._model)])
        return [price_from_proto(p) for p in billing_pb2.ListPricesResponse.FromString(reply.SerializeToString()).prices]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(schedule, usage)
def test_the_routers_quote_is_billings_charge(tmp_path: Path, prices, use) -> None:
    ledger, model = Ledger(), next(MODELS)
    for version, offset, inp, out, cached in prices:
        admin.create_price(ledger.tx, Price("", model, version, inp, out, cached, T0 + offset), "ops", T0)
    meter = Meter(BillingPrices(ledger, model), UsageSpool(tmp_path / f"{model}.db"))  # type: ignore[arg-type]
    asyncio.run(meter.refresh_prices())

    version, offset, prompt, completion, cached = use
    end = EPOCH + timedelta(microseconds=T0 + offset)
    record = UsageRecord(model, "acme", "k1", model, version, prompt, completion, UsageStatus.COMPLETED,
                         TrafficClass.INTERACTIVE, model, "0" * 32, end, end, cached=cached)
    quote = meter.local_cost(record)

    event = convert.event(billing_pb2.UsageEvent.FromString(usage_to_proto(record).SerializeToString()))
    try:
        charged = ledger.ingester.ingest(ledger.tx, [event], T0).single()
    except FailedPrecondition as unpriced:
        assert unpriced.reason == "UNPRICED_MODEL"
        assert quote is None, "the router quoted usage billing finds unpriced"
        return
    assert quote is not None, "billing charged usage the router could not quote"
    assert (quote.micros, quote.currency_code) == (charged.cost_micros, "USD")


def test_a_naive_end_time_is_quoted_as_billing_reads_it(tmp_path: Path) -> None:
    """protobuf takes a naive datetime as UTC; so does the router's quote."""
    ledger, model = Ledger(), next(MODELS)
    at = datetime(2026, 1, 1, 12, tzinfo=UTC)
    admin.create_price(ledger.tx, Price("", model, "", 1_000_000, 1_000_000, None,
                                        (at - EPOCH) // timedelta(microseconds=1)), "ops", T0)
    meter = Meter(BillingPrices(ledger, model), UsageSpool(tmp_path / "spool.db"))  # type: ignore[arg-type]
    asyncio.run(meter.refresh_prices())
    naive = at.replace(tzinfo=None)
    record = UsageRecord(model, "acme", "k1", model, "", 5, 5, UsageStatus.COMPLETED, TrafficClass.INTERACTIVE,
                         model, "0" * 32, naive, naive)
    quote = meter.local_cost(record)
    assert quote is not None and quote.micros == 10
    charged = ledger.ingester.ingest(ledger.tx, [convert.event(usage_to_proto(record))], T0).single()
    assert charged.cost_micros == quote.micros


def test_an_event_is_charged_its_quoted_price_while_that_was_in_force_within_the_grace() -> None:
    from services.common.pricing import Price, PriceTable

    old = Price("old", "m", "", 1_000_000, 2_000_000, None, effective_us=0)
    new = Price("new", "m", "", 5_000_000, 6_000_000, None, effective_us=100_000_000)
    versioned = Price("ver", "m", "v2", 7_000_000, 8_000_000, None, effective_us=50_000_000)
    table = PriceTable([old, new, versioned])
    grace = 15_000_000
    assert table.charged("m", "v1", 110_000_000, "old", grace) == old  # superseded 10 s before: still quoted
    assert table.charged("m", "v1", 120_000_000, "old", grace) == new  # superseded 20 s before: past the grace
    assert table.charged("m", "v1", 110_000_000, "new", grace) == new
    assert table.charged("m", "v1", 110_000_000, "", grace) == new  # no quote: the price in force
    assert table.charged("m", "v1", 110_000_000, "old", 0) == new  # no grace configured
    assert table.charged("m", "v1", 110_000_000, "nonsense", grace) == new
    # A price of another version was never this version's: it is never charged for it.
    assert table.charged("m", "v1", 110_000_000, "ver", grace) == new
    assert table.charged("m", "v2", 110_000_000, "ver", grace) == versioned
    # v2's own price took over from the model-wide one at 50 s: the model-wide quote holds until 65 s.
    assert table.charged("m", "v2", 60_000_000, "old", grace) == old
    assert table.charged("m", "v2", 70_000_000, "old", grace) == versioned
