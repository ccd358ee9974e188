"""The router's Prometheus metrics move as a user's requests do: requests by status, tokens and spend by
tenant, time to first token — read from the real /metrics endpoint."""

from __future__ import annotations

import asyncio
import re
import urllib.request

from autoglm.router.v1 import router_service_pb2 as pb2
from services.common.metrics import start_metrics_endpoint
from tests.integration.router.conftest import MODEL, Mesh
from tests.integration.router.test_router_vertical import GREEDY, bearer
from tests.waiting import wait_until

METRICS_PORT = start_metrics_endpoint(0)


def scrape() -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{METRICS_PORT}/metrics", timeout=5) as reply:
        return str(reply.read().decode())


def value(body: str, name: str, **labels: str) -> float:
    """Sum of every series of `name` whose labels include `labels`."""
    return sum(float(line.rsplit(" ", 1)[1]) for line in body.splitlines()
               if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()))


async def test_requests_tokens_spend_and_ttft_are_exported(mesh: Mesh) -> None:
    secret, _ = await mesh.create_key("metrics-tenant")
    before = await asyncio.to_thread(scrape)
    request = pb2.GenerateRequest(model=MODEL, prompt="Name a colour.", sampling=GREEDY)
    replies = [r async for r in mesh.router_stub.Generate(request, metadata=bearer(secret), timeout=60)]
    usage, cost = replies[-1].summary.usage, replies[-1].summary.cost
    # The usage event (and with it the metrics) is settled right after the last message: wait for it.
    async def settled() -> str | None:
        body = await asyncio.to_thread(scrape)
        return body if value(body, "autoglm_router_requests_total", model=MODEL, status="COMPLETED") > value(
            before, "autoglm_router_requests_total", model=MODEL, status="COMPLETED") else None

    after = await wait_until(settled, 10, "the router to count the finished request")

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("autoglm_router_requests_total", model=MODEL, status="COMPLETED") == 1
    assert delta("autoglm_router_tokens_total", tenant="metrics-tenant", kind="completion") == usage.completion_tokens
    assert delta("autoglm_router_tokens_total", tenant="metrics-tenant", kind="prompt") == usage.prompt_tokens
    assert delta("autoglm_router_spend_micros_total", tenant="metrics-tenant", currency="USD") == cost.micros
    assert delta("autoglm_router_time_to_first_token_seconds_count", model=MODEL) == 1
    assert re.search(r'autoglm_rpc_handled_total\{code="OK",method="/autoglm.router.v1.RouterService/Generate"', after)
