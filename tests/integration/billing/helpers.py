"""Builders of billing requests shared by the billing tests."""

from __future__ import annotations

import grpc
from google.protobuf import timestamp_pb2

from autoglm.billing.v1 import billing_service_pb2 as pb2
from autoglm.common.v1 import money_pb2
from services.cli.endpoint import operator_channel
from services.common.grpc_server import RunningServer

# The operator token the in-process billing servers of the tests are configured with.
OPERATOR_TOKEN = "billing-operator-token-of-the-tests"


def operator(running: RunningServer | str, token: str = OPERATOR_TOKEN) -> grpc.aio.Channel:
    """A channel to billing that sends the operator token on every call."""
    return operator_channel(running if isinstance(running, str) else running.address, token)


# 2 USD per million prompt tokens, 6 USD per million completion tokens.
INPUT_PRICE = 2_000_000
OUTPUT_PRICE = 6_000_000


def usd(micros: int) -> money_pb2.Money:
    return money_pb2.Money(currency_code="USD", micros=micros)


def ts(seconds: float) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromMicroseconds(int(seconds * 1_000_000))
    return stamp


def price_request(model: str = "smollm2", effective: float = 1_000_000_000, **kw: int) -> pb2.CreatePriceRequest:
    return pb2.CreatePriceRequest(price=pb2.Price(
        model=model, input_per_million=usd(kw.get("input", INPUT_PRICE)),
        output_per_million=usd(kw.get("output", OUTPUT_PRICE)), effective_time=ts(effective)), actor="ops")


def usage(event_id: str, prompt: int = 100, completion: int = 50, tenant: str = "acme", key: str = "k1",
          model: str = "smollm2", end: float | None = None, **extra: object) -> pb2.UsageEvent:
    fields: dict[str, object] = {"status": pb2.USAGE_STATUS_COMPLETED}
    fields.update(extra)
    event = pb2.UsageEvent(event_id=event_id, tenant_id=tenant, api_key_id=key, model=model, prompt_tokens=prompt,
                           completion_tokens=completion, **fields)  # type: ignore[arg-type]
    if end is not None:
        event.end_time.CopyFrom(ts(end))
    return event


def expected_cost(prompt: int, completion: int) -> int:
    return (prompt * INPUT_PRICE + completion * OUTPUT_PRICE + 500_000) // 1_000_000


def tenant_budget(tenant: str, micros: int = 0, tokens: int = 0, **kw: object) -> pb2.CreateBudgetRequest:
    budget = pb2.Budget(scope=pb2.BudgetScope(kind=pb2.SCOPE_KIND_TENANT, tenant_id=tenant),
                        period=pb2.BudgetPeriod(kind=kw.pop("period", pb2.PERIOD_KIND_MONTHLY),  # type: ignore[arg-type]
                                                time_zone=str(kw.pop("tz", "UTC"))),
                        tokens=tokens, enforcement=kw.pop("enforcement", pb2.ENFORCEMENT_HARD))  # type: ignore[arg-type]
    if micros:
        budget.amount.CopyFrom(usd(micros))
    return pb2.CreateBudgetRequest(budget=budget, actor="ops")
