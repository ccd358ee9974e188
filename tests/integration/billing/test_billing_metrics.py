"""Billing's Prometheus metrics as a scraper sees them on /metrics: spend per tenant, events recorded /
duplicate / rejected, budget utilisation and alert level."""

from __future__ import annotations

import asyncio
import urllib.request
import uuid
from collections.abc import Iterator

import pytest
from prometheus_client import start_http_server
from prometheus_client.parser import text_string_to_metric_families

from autoglm.billing.v1 import billing_service_pb2 as pb2
from autoglm.billing.v1 import billing_service_pb2_grpc as pb2_grpc
from tests.integration.billing.helpers import (
    expected_cost,
    operator,
    price_request,
    tenant_budget,
    usage,
)


@pytest.fixture
def metrics_url() -> Iterator[str]:
    server, thread = start_http_server(0, addr="127.0.0.1")
    try:
        yield f"http://127.0.0.1:{server.server_port}/metrics"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


async def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=10).read().decode())
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def events(sample: dict[tuple[str, tuple[tuple[str, str], ...]], float], result: str) -> float:
    return sample.get(("autoglm_billing_events_total", (("result", result),)), 0.0)


async def test_metrics_endpoint_shows_spend_events_utilisation_and_level(billing, metrics_url: str) -> None:
    tenant = f"t{uuid.uuid4().hex[:8]}"
    before = await scrape(metrics_url)
    async with operator(billing) as chan:
        stub = pb2_grpc.BillingServiceStub(chan)
        await stub.CreatePrice(price_request())
        created = await stub.CreateBudget(tenant_budget(tenant, tokens=1000))
        acks = [a async for a in stub.StreamUsage(iter([
            pb2.StreamUsageRequest(event=usage("m1", prompt=600, completion=0, tenant=tenant)),
            pb2.StreamUsageRequest(event=usage("m2", prompt=250, completion=0, tenant=tenant)),
            pb2.StreamUsageRequest(event=usage("m1", prompt=600, completion=0, tenant=tenant)),  # duplicate
            pb2.StreamUsageRequest(event=usage("m3", prompt=-1, tenant=tenant))]))]  # rejected
    after = await scrape(metrics_url)
    budget = (("budget_id", created.budget.budget_id), ("tenant", tenant))
    assert [bool(a.error_code) for a in acks] == [False, False, False, True]
    assert after[("autoglm_billing_spend_micros_total", (("currency", "USD"), ("tenant", tenant)))] == \
        expected_cost(600, 0) + expected_cost(250, 0)
    assert events(after, "recorded") - events(before, "recorded") == 2
    assert events(after, "duplicate") - events(before, "duplicate") == 1
    assert events(after, "rejected") - events(before, "rejected") == 1
    assert after[("autoglm_billing_budget_utilization_permille", budget)] == 850
    assert after[("autoglm_billing_budget_alert_level", budget)] == 1  # WARNING
