"""Every service and sidecar of a running mesh serves Prometheus metrics, and every metric the Grafana
dashboard (deploy/grafana/autoglm-mesh.json) queries is among them once traffic has flowed."""

from __future__ import annotations

import asyncio
import json
import re
import urllib.request

from autoglm.billing.v1 import billing_service_pb2, billing_service_pb2_grpc
from autoglm.common.v1 import money_pb2
from autoglm.router.v1 import router_service_pb2_grpc
from services.cli.endpoint import billing_token, load_endpoint, operator_channel
from tests.conftest import ROOT
from tests.e2e.mesh_client import create_key, generate_request, router_channel, stream
from tests.e2e.mesh_process import free_port, start_mesh, stop_mesh
from tests.waiting import wait_until

DASHBOARD = ROOT / "deploy" / "grafana" / "autoglm-mesh.json"
FUNCTIONS = {"sum", "by", "rate", "increase", "max", "histogram_quantile", "le"}


def dashboard_metrics() -> set[str]:
    doc = json.loads(DASHBOARD.read_text())
    names = set()
    for panel in doc["panels"]:
        for target in panel["targets"]:
            for token in re.findall(r"[a-z_][a-z0-9_]*(?=[\[{(\s)])", target["expr"] + " "):
                if token.startswith(("autoglm_", "sidecar_")):
                    names.add(re.sub(r"_(bucket|count|sum)$", "", token))
    return names


def scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as reply:
        return str(reply.read().decode())


async def test_dashboard_queries_only_metrics_the_mesh_exports(tmp_path, processes) -> None:
    ports = {"router": {"metrics_port": free_port()}, "billing": {"metrics_port": free_port()},
             "inference": {"metrics_port": free_port()}}
    mesh = start_mesh(tmp_path, processes, extra_config=ports)
    key = await create_key(mesh, "observed")
    async with router_channel(mesh) as channel:
        outcome = await stream(router_service_pb2_grpc.RouterServiceStub(channel), key,
                               generate_request("Say hi.", 4))
    assert outcome.tokens > 0
    # A budget so utilisation and alert level have a series.
    async with operator_channel(load_endpoint(mesh.data_dir).billing, billing_token(mesh.data_dir)) as chan:
        await billing_service_pb2_grpc.BillingServiceStub(chan).CreateBudget(billing_service_pb2.CreateBudgetRequest(
            budget=billing_service_pb2.Budget(
                scope=billing_service_pb2.BudgetScope(kind=billing_service_pb2.SCOPE_KIND_TENANT, tenant_id="observed"),
                period=billing_service_pb2.BudgetPeriod(kind=billing_service_pb2.PERIOD_KIND_MONTHLY),
                amount=money_pb2.Money(currency_code="USD", micros=1_000_000),
                enforcement=billing_service_pb2.ENFORCEMENT_HARD)), timeout=10)
    async with router_channel(mesh) as channel:
        await stream(router_service_pb2_grpc.RouterServiceStub(channel), key, generate_request("Say bye.", 4))

    endpoints = json.loads((mesh.data_dir / "endpoint.json").read_text())["metrics"]
    assert {"router", "billing", "inference-0", "router-sidecar", "billing-sidecar", "inference-0-sidecar"} <= set(
        endpoints)
    missing: set[str] = set()

    async def all_exported() -> bool:
        nonlocal missing
        bodies = {name: await asyncio.to_thread(scrape, url) for name, url in endpoints.items()}
        exported = {line.split("{")[0].split(" ")[0] for body in bodies.values() for line in body.splitlines()
                    if line and not line.startswith("#")}
        exported |= {re.sub(r"_(bucket|count|sum|total)$", "", n) for n in exported}
        missing = {m for m in dashboard_metrics() if m not in exported and re.sub(r"_total$", "", m) not in exported}
        return not missing

    try:  # budget gauges refresh on billing's next tick
        await wait_until(all_exported, 30, "every metric the dashboard queries to be exported", interval=0.5)
    except AssertionError:
        pass  # the assertion below names them
    assert not missing, f"the dashboard queries metrics nobody exports: {sorted(missing)}"
    assert stop_mesh(mesh) == 0
