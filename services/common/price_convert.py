"""`Price` <-> `autoglm.billing.v1.Price`: the one conversion billing answers ListPrices with and the
router reads it back with (so both hold the same table)."""

from __future__ import annotations

from google.protobuf.timestamp_pb2 import Timestamp

from autoglm.billing.v1 import billing_service_pb2 as pb2
from autoglm.common.v1 import money_pb2
from services.common.pricing import Price


def _to_us(seconds: int, nanos: int) -> int:
    return seconds * 1_000_000 + nanos // 1000


def price_from_proto(p: pb2.Price) -> Price:
    currency = p.input_per_million.currency_code or p.output_per_million.currency_code
    return Price(price_id=p.price_id, model=p.model, model_version=p.model_version,
                 input_per_million=p.input_per_million.micros, output_per_million=p.output_per_million.micros,
                 cached_per_million=p.cached_per_million.micros if p.HasField("cached_per_million") else None,
                 effective_us=_to_us(p.effective_time.seconds, p.effective_time.nanos)
                 if p.HasField("effective_time") else 0,
                 currency=currency or "USD")


def price_to_proto(p: Price) -> pb2.Price:
    def money(micros: int) -> money_pb2.Money:
        return money_pb2.Money(currency_code=p.currency, micros=micros)

    seconds, micros = divmod(p.effective_us, 1_000_000)
    out = pb2.Price(price_id=p.price_id, model=p.model, model_version=p.model_version,
                    input_per_million=money(p.input_per_million), output_per_million=money(p.output_per_million),
                    effective_time=Timestamp(seconds=seconds, nanos=micros * 1000))
    if p.cached_per_million is not None:
        out.cached_per_million.CopyFrom(money(p.cached_per_million))
    return out
