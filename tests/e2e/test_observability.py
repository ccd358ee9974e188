"""Every service and sidecar of a running mesh serves Prometheus metrics, and a real Prometheus scraping them
answers every query of the Grafana dashboard (deploy/grafana/autoglm-mesh.json) once traffic has flowed."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import grpc

from autoglm.billing.v1 import billing_service_pb2, billing_service_pb2_grpc
from autoglm.common.v1 import money_pb2
from autoglm.router.v1 import router_service_pb2_grpc
from services.cli.endpoint import billing_token, load_endpoint, operator_channel
from tests.conftest import ROOT, require_real_component
from tests.e2e.mesh_client import create_key, generate_request, router_channel, stream
from tests.e2e.mesh_process import free_port, start_mesh, stop_mesh
from tests.waiting import wait_until

DASHBOARD = ROOT / "deploy" / "grafana" / "autoglm-mesh.json"
def dashboard_queries() -> list[tuple[str, str]]:
    doc = json.loads(DASHBOARD.read_text())
    return [(panel["title"], target["expr"]) for panel in doc["panels"] for target in panel["targets"]]


def start_prometheus(tmp_path: Path, targets: dict[str, str], processes: list) -> str:
    """A real Prometheus (Debian's `prometheus`) scraping `targets` (name -> metrics URL) every second; its
    base URL. Stopped by PID with the test's other processes."""
    binary = shutil.which("prometheus")
    require_real_component(binary is not None, "the prometheus server", "install Debian's `prometheus`: "
                           "make prometheus-server")
    assert binary is not None
    jobs = []
    for name, url in sorted(targets.items()):
        parsed = urllib.parse.urlsplit(url)
        jobs.append({"job_name": name, "metrics_path": parsed.path or "/metrics", "scheme": parsed.scheme,
                     "static_configs": [{"targets": [parsed.netloc]}]})
    config = tmp_path / "prometheus.yml"
    config.write_text(json.dumps({"global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                                  "scrape_configs": jobs}))
    port = free_port()
    log = (tmp_path / "prometheus.log").open("wb")
    processes.append(subprocess.Popen(
        [binary, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
    return f"http://127.0.0.1:{port}"


def prometheus_api(base: str, path: str, **params: str) -> dict[str, Any]:
    url = f"{base}{path}?{urllib.parse.urlencode(params)}" if params else base + path
    with urllib.request.urlopen(url, timeout=5) as reply:
        body: dict[str, Any] = json.loads(reply.read())
    assert body["status"] == "success", body
    return body["data"]  # type: ignore[no-any-return]


async def test_every_dashboard_query_returns_data_from_a_real_prometheus_scraping_the_mesh(
    tmp_path, processes,
) -> None:
    """The Grafana dashboard proven against what a user would run: a real Prometheus scraping every service
    and sidecar of a running mesh answers each of its queries with at least one series once traffic (a
    budgeted tenant's generations and a refused call) has flowed — not only names that exist somewhere."""
    ports = {"router": {"metrics_port": free_port()}, "billing": {"metrics_port": free_port()},
             "inference": {"metrics_port": free_port()}}
    mesh = start_mesh(tmp_path, processes, extra_config=ports)
    endpoints = json.loads((mesh.data_dir / "endpoint.json").read_text())["metrics"]
    assert {"router", "billing", "inference-0", "router-sidecar", "billing-sidecar", "inference-0-sidecar"} <= set(
        endpoints)
    prometheus = start_prometheus(tmp_path, endpoints, processes)

    def every_target_scraped() -> bool:
        try:
            active = prometheus_api(prometheus, "/api/v1/targets")["activeTargets"]
        except OSError:
            return False  # not listening yet
        return len(active) == len(endpoints) and all(t["health"] == "up" for t in active)

    await wait_until(lambda: asyncio.to_thread(every_target_scraped), 60, "Prometheus to scrape every target",
                     interval=0.5)

    # Traffic after the first scrapes, so rates and increases have something to show.
    key = await create_key(mesh, "observed")
    async with operator_channel(load_endpoint(mesh.data_dir).billing, billing_token(mesh.data_dir)) as chan:
        await billing_service_pb2_grpc.BillingServiceStub(chan).CreateBudget(billing_service_pb2.CreateBudgetRequest(
            budget=billing_service_pb2.Budget(
                scope=billing_service_pb2.BudgetScope(kind=billing_service_pb2.SCOPE_KIND_TENANT, tenant_id="observed"),
                period=billing_service_pb2.BudgetPeriod(kind=billing_service_pb2.PERIOD_KIND_MONTHLY),
                amount=money_pb2.Money(currency_code="USD", micros=1_000_000),
                enforcement=billing_service_pb2.ENFORCEMENT_HARD)), timeout=10)
    empty: list[str] = []

    def every_query_answers() -> bool:
        nonlocal empty
        empty = []
        for title, expr in dashboard_queries():
            result = prometheus_api(prometheus, "/api/v1/query", query=expr)["result"]
            if not [r for r in result if r["value"][1] not in ("NaN", "+Inf", "-Inf")]:
                empty.append(f"{title}: {expr}")
        return not empty

    async with router_channel(mesh) as channel:
        stub = router_service_pb2_grpc.RouterServiceStub(channel)
        refused = await stream(stub, "agk_not-a-key", generate_request("Say hi.", 4))
        assert refused.code == grpc.StatusCode.UNAUTHENTICATED
        sent = 0

        async def traffic_then_answers() -> bool:
            # A series Prometheus first sees after a request has no rate until a later scrape sees it grow:
            # keep a generation going between looks, as a live mesh would.
            nonlocal sent
            assert (await stream(stub, key, generate_request(f"Say hi, number {sent}.", 4))).tokens > 0
            sent += 1
            return await asyncio.to_thread(every_query_answers)

        try:
            await wait_until(traffic_then_answers, 90, "every dashboard query to return data", interval=1.0)
        except AssertionError:
            pass  # the assertion below names them
    assert not empty, "dashboard queries that return no data from the mesh:\n" + "\n".join(empty)
    assert stop_mesh(mesh) == 0
