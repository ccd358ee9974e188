"""One trace id spans every hop of a Generate call through the real mesh — client → router sidecar →
router → inference sidecar → inference, and on to billing — in the OpenTelemetry spans every process
exports and in the JSON log lines of every process the request called.

A request admitted against the router's billing leases (every request once the router has learned its
caller's budgets) calls no billing RPC: its usage event reaches billing over the router's long-lived usage
stream, and billing exports a `billing.usage` span for the event as the child of the router's span of the
request, so the request's trace still shows where its tokens were billed."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import time
import urllib.request

import pytest

from autoglm.common.v1 import generation_pb2
from autoglm.router.v1 import router_service_pb2, router_service_pb2_grpc
from services.common.ports import free_port
from tests.e2e.mesh_client import router_channel
from tests.e2e.mesh_process import start_mesh, stop_mesh
from tests.e2e.otlp_collector import start_collector

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"


@pytest.fixture
def otlp_env(monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    def apply(port: int) -> None:
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"127.0.0.1:{port}")
        monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "200")

    return apply


def lease_admissions(metrics_port: int) -> float:
    """The router's count of requests admitted against its billing leases (from its /metrics)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as answer:
        text = answer.read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith('autoglm_router_budget_admissions_total{path="lease"}'))


async def test_one_trace_id_spans_every_hop(tmp_path, processes: list[subprocess.Popen[bytes]], otlp_env) -> None:
    server, collector, port = await start_collector()
    try:
        otlp_env(port)
        metrics_port = free_port()
        mesh = start_mesh(tmp_path, processes, extra_config={"router": {"metrics_port": metrics_port}})
        key = (mesh.data_dir / "demo_api_key").read_text().strip()
        async with router_channel(mesh) as channel:
            stub = router_service_pb2_grpc.RouterServiceStub(channel)
            request = router_service_pb2.GenerateRequest(
                model="smollm2-135m-instruct", prompt="Say hello.",
                sampling=generation_pb2.SamplingParams(max_tokens=4),
                cache_policy=router_service_pb2.CACHE_POLICY_BYPASS)
            auth = (("authorization", f"Bearer {key}"),)
            # Untraced requests until the router admits one against its leases: the traced one then takes
            # the path every request takes in steady state (no billing RPC of its own).
            deadline = time.monotonic() + 60
            while await asyncio.to_thread(lease_admissions, metrics_port) < 1:
                assert time.monotonic() < deadline, "the router never admitted a request against its leases"
                [m async for m in stub.Generate(request, metadata=auth, timeout=120)]
            admitted = await asyncio.to_thread(lease_admissions, metrics_port)
            metadata = (*auth, ("traceparent", f"00-{TRACE_ID}-00f067aa0ba902b7-01"))
            messages = [m async for m in stub.Generate(request, metadata=metadata, timeout=120)]
        assert messages[-1].summary.trace_id == TRACE_ID
        assert await asyncio.to_thread(lease_admissions, metrics_port) == admitted + 1

        expected = {"sidecar-router", "router", "sidecar-inference", "inference", "billing"}
        seen = await collector.wait_for(TRACE_ID, expected, timeout_s=30)
        assert expected <= set(seen), seen
        assert "autoglm.router.v1.RouterService/Generate" in seen["router"]
        assert "autoglm.inference.v1.InferenceService/Generate" in seen["inference"]
        assert seen["billing"] == ["billing.usage"], seen["billing"]  # the event, not a Reserve or a Settle
        spans = {(span.service, span.name): span for span in collector.spans if span.trace_id == TRACE_ID}
        router_span = spans[("router", "autoglm.router.v1.RouterService/Generate")]
        assert spans[("billing", "billing.usage")].parent_span_id == router_span.span_id

        # Off the event loop: the collector serves on it, and every process flushes its spans as it stops.
        assert await asyncio.to_thread(stop_mesh, mesh) == 0
        logs = mesh.data_dir / "logs"
        for name in ("router-sidecar", "router", "inference-0-sidecar", "inference-0"):
            # Every line that starts a JSON record is exactly one record (no interleaving between threads).
            lines = [json.loads(line) for line in (logs / f"{name}.log").read_text().splitlines()
                     if line.startswith("{")]
            assert any(line.get("trace_id") == TRACE_ID for line in lines), f"{name}.log has no line of the trace"
    finally:
        await server.stop(0)
        os.environ.pop("OTEL_EXPORTER_OTLP_ENDPOINT", None)
