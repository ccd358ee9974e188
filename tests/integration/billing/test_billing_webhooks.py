"""Webhook delivery of budget alerts to a real HTTP server on 127.0.0.1 (named in billing's webhook_allow):
one JSON POST per alert; a failing endpoint is retried with backoff until it answers 2xx, and then not
again. Without the allow-list, a budget whose webhook points at a loopback or private address is refused."""

from __future__ import annotations

import asyncio
import itertools
import json
import queue
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import grpc
import pytest

from autoglm.billing.v1 import billing_service_pb2 as pb2
from autoglm.billing.v1 import billing_service_pb2_grpc as pb2_grpc
from services.billing.config import BillingConfig
from services.billing.server import build_server
from services.common.config import ServerSettings
from services.common.grpc_server import RunningServer
from tests.integration.billing.helpers import OPERATOR_TOKEN, operator, price_request, tenant_budget, usage

BACKOFF_S = 0.05


class Hooks:
    """An HTTP endpoint that records every POST and fails the first `failures` of them with 503."""

    def __init__(self, failures: int = 0) -> None:
        self.failures = failures
        self.received: queue.Queue[tuple[float, int, dict[str, Any], str]] = queue.Queue()
        hooks = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                status = 503 if hooks.failures > 0 else 200
                hooks.failures -= 1
                self.send_response(status)
                self.end_headers()
                hooks.received.put((time.monotonic(), status, body, self.headers["Content-Type"]))

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/alerts"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    async def next(self) -> tuple[float, int, dict[str, Any], str]:
        return await asyncio.to_thread(self.received.get, True, 20)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def hooks(request: pytest.FixtureRequest) -> Iterator[Hooks]:
    endpoint = Hooks(getattr(request, "param", 0))
    try:
        yield endpoint
    finally:
        endpoint.close()


async def _billing_with_hook(serve, tmp_path: Path) -> RunningServer:  # type: ignore[no-untyped-def]
    config = BillingConfig(server=ServerSettings(port=0), database=f"sqlite:///{tmp_path / 'b.db'}",
                           operator_token=OPERATOR_TOKEN,
                           webhook_backoff_s=BACKOFF_S, webhook_attempts=5, webhook_allow=("127.0.0.1",))
    return await serve(build_server(config))


async def test_crossing_eighty_percent_posts_one_json_alert(serve, tmp_path: Path, hooks: Hooks) -> None:
    running = await _billing_with_hook(serve, tmp_path)
    async with operator(running) as chan:
        stub = pb2_grpc.BillingServiceStub(chan)
        await stub.CreatePrice(price_request())
        budget = tenant_budget("acme", tokens=1000)
        budget.budget.webhook_url = hooks.url
        created = await stub.CreateBudget(budget)
        await stub.RecordUsage(pb2.RecordUsageRequest(event=usage("e1", prompt=850, completion=0)))
        _, status, warning, content_type = await hooks.next()
        await stub.RecordUsage(pb2.RecordUsageRequest(event=usage("e2", prompt=50, completion=0)))  # 90 %: no alert
        await stub.RecordUsage(pb2.RecordUsageRequest(event=usage("e3", prompt=150, completion=0)))  # 105 %
        _, _, critical, _ = await hooks.next()
    assert (status, content_type) == (200, "application/json")
    assert warning["level"] == "WARNING" and warning["budget_id"] == created.budget.budget_id
    assert (warning["tenant_id"], warning["utilization_permille"]) == ("acme", 850)
    assert critical["level"] == "CRITICAL"  # the next POST: the warning was not sent again
    assert int(critical["cursor"]) > int(warning["cursor"])


@pytest.mark.parametrize("hooks", [2], indirect=True)
async def test_failing_endpoint_is_retried_with_backoff_then_delivered_once(serve, tmp_path: Path,
                                                                            hooks: Hooks) -> None:
    running = await _billing_with_hook(serve, tmp_path)
    async with operator(running) as chan:
        stub = pb2_grpc.BillingServiceStub(chan)
        await stub.CreatePrice(price_request())
        budget = tenant_budget("acme", tokens=1000)
        budget.budget.webhook_url = hooks.url
        await stub.CreateBudget(budget)
        await stub.RecordUsage(pb2.RecordUsageRequest(event=usage("e1", prompt=800, completion=0)))
        attempts = [await hooks.next() for _ in range(3)]
        await stub.RecordUsage(pb2.RecordUsageRequest(event=usage("e2", prompt=200, completion=0)))  # 100 %
        after = await hooks.next()
    assert [a[1] for a in attempts] == [503, 503, 200]
    assert all(a[2] == attempts[0][2] and a[2]["level"] == "WARNING" for a in attempts)
    gaps = [later[0] - earlier[0] for earlier, later in itertools.pairwise(attempts)]
    assert gaps[0] >= BACKOFF_S and gaps[1] >= 2 * BACKOFF_S  # exponential backoff between attempts
    assert after[2]["level"] == "CRITICAL"  # delivered once: no further WARNING attempt came before this


@pytest.mark.parametrize(("url", "message"), [
    ("http://127.0.0.1:9/alerts", "resolves to 127.0.0.1, a loopback, private"),
    ("http://localhost:9/alerts", "non-public address"),
    ("http://169.254.169.254/latest/meta-data", "resolves to 169.254.169.254"),
    ("http://[::1]/x", "resolves to ::1"),
    ("http://10.1.2.3/x", "resolves to 10.1.2.3"),
    ("http://0.0.0.0:80/", "resolves to 0.0.0.0"),
    ("ftp://hooks.example/x", "must be an http:// or https:// URL"),
    ("file:///etc/passwd", "must be an http:// or https:// URL"),
    ("http://hooks.example:99999/", "not a valid URL"),
])
async def test_webhook_to_a_private_address_or_other_scheme_is_refused_at_creation(
        serve, tmp_path: Path, url: str, message: str) -> None:
    config = BillingConfig(server=ServerSettings(port=0), database=f"sqlite:///{tmp_path / 'b.db'}",
                           operator_token=OPERATOR_TOKEN)
    running = await serve(build_server(config))
    async with operator(running) as chan:
        stub = pb2_grpc.BillingServiceStub(chan)
        budget = tenant_budget("acme", tokens=1000)
        budget.budget.webhook_url = url
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.CreateBudget(budget)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "budget.webhook_url" in (caught.value.details() or "")
        assert message in (caught.value.details() or "")
        created = await stub.CreateBudget(tenant_budget("acme", tokens=1000))  # no webhook: fine
        change = pb2.UpdateBudgetRequest(budget=pb2.Budget(budget_id=created.budget.budget_id, tokens=1000,
                                                           webhook_url=url))
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.UpdateBudget(change)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
