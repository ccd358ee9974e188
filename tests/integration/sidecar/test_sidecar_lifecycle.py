"""Certificates rotated under load fail no call; a policy change applies to new calls without dropping a
stream in flight; the admin RPC shows the policy in force; one trace id crosses every hop."""

from __future__ import annotations

import asyncio
import datetime as dt
import shutil
import socket
import ssl
import time
from pathlib import Path

import grpc
import pytest
import yaml
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from structlog.testing import capture_logs

from autoglm.billing.v1 import billing_service_pb2 as billing_pb
from autoglm.billing.v1 import billing_service_pb2_grpc as billing_grpc
from autoglm.inference.v1 import inference_service_pb2 as inf_pb
from autoglm.inference.v1 import inference_service_pb2_grpc as inf_grpc
from autoglm.router.v1 import router_service_pb2 as router_pb
from autoglm.router.v1 import router_service_pb2_grpc as router_grpc
from autoglm.sidecar.v1 import sidecar_admin_service_pb2 as admin_pb
from autoglm.sidecar.v1 import sidecar_admin_service_pb2_grpc as admin_grpc
from services.cli.launcher import renew_certificates
from services.common.grpc_server import start_server
from services.common.tracing import outgoing_metadata
from sidecar import certs
from sidecar.runtime import RunningSidecar, SidecarConfig, build_sidecar
from tests.integration.sidecar.conftest import Mesh, start_mesh, write_policy
from tests.waiting import wait_until


def served_certificate(address: str, pki: Path) -> bytes:
    """The DER certificate a sidecar presents to a new connection (a real TLS handshake)."""
    host, port = address.rsplit(":", 1)
    ctx = ssl.create_default_context(cafile=str(pki / "ca.pem"))
    ctx.check_hostname = False
    ctx.load_cert_chain(str(pki / "router.pem"), str(pki / "router.key"))
    ctx.set_alpn_protocols(["h2"])
    with socket.create_connection((host, int(port)), timeout=5) as raw, ctx.wrap_socket(raw) as tls:
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return der


def pem_to_der(pem: bytes) -> bytes:
    return ssl.PEM_cert_to_DER_cert(pem.decode())


async def test_rotating_certificates_under_load_fails_no_call(tmp_path: Path, pki: Path, serve) -> None:
    own_pki = tmp_path / "pki"
    shutil.copytree(pki, own_pki)
    started: list[RunningSidecar] = []
    try:
        mesh = await start_mesh(own_pki, write_policy(tmp_path / "p.yaml"), serve, started)
        before = served_certificate(mesh.inference_sidecar.inbound_address, own_pki)
        stop = asyncio.Event()
        codes: list[grpc.StatusCode] = []

        async def load(stub: inf_grpc.InferenceServiceStub) -> None:
            while not stop.is_set():
                try:
                    await stub.CountTokens(inf_pb.CountTokensRequest(prompt="a"), timeout=5)
                    codes.append(grpc.StatusCode.OK)
                except grpc.aio.AioRpcError as err:
                    codes.append(err.code())

        async with mesh.router_outbound() as chan:
            stub = inf_grpc.InferenceServiceStub(chan)
            workers = [asyncio.create_task(load(stub)) for _ in range(4)]
            stream = stub.Generate(inf_pb.GenerateRequest(prompt="x"), timeout=30)
            await wait_until(lambda: len(codes) >= 50, 60, "50 calls through the sidecars", interval=0.01)
            for service in ("inference", "router"):
                certs.issue_to(own_pki, service)
            new = pem_to_der((own_pki / "inference.pem").read_bytes())
            await wait_until(lambda: served_certificate(mesh.inference_sidecar.inbound_address, own_pki) == new, 10,
                             "the inference sidecar to serve the renewed certificate")
            mark = len(codes)
            await wait_until(lambda: len(codes) >= mark + 50, 60, "50 more calls after the renewal", interval=0.01)
            stop.set()
            await asyncio.gather(*workers)
            assert [m.delta async for m in stream] == ["tok0 ", "tok1 ", "tok2 "]
        assert before != new
        assert set(codes) == {grpc.StatusCode.OK}, {c for c in codes if c != grpc.StatusCode.OK}
        assert mesh.router_sidecar.certs.version >= 2
    finally:
        for running in reversed(started):
            await running.stop(grace=0)


def serial_of(der: bytes) -> int:
    from cryptography import x509

    return x509.load_der_x509_certificate(der).serial_number


MESH_SERVICES = ("router", "inference", "billing")


def short_lived_pki(pki: Path, directory: Path, lifetime: dt.timedelta) -> Path:
    shutil.copytree(pki, directory)
    for service in MESH_SERVICES:
        certs.issue_to(directory, service, ttl=lifetime)
    return directory


async def check_renewal_keeps_streams_and_reaches_new_connections(mesh: Mesh, own_pki: Path,
                                                                  lifetime: dt.timedelta) -> None:
    """Run the launcher's renewal loop over `mesh`'s short-lived certificates: a stream opened before the
    renewal carries on, a new connection is served the new certificate (another serial), a new call works."""
    first = serial_of(served_certificate(mesh.billing_sidecar.inbound_address, own_pki))
    renewer = None
    try:
        async with mesh.router_outbound() as chan:
            stub = billing_grpc.BillingServiceStub(chan)
            stream = stub.StreamUsage(timeout=60)
            await stream.write(billing_pb.StreamUsageRequest(event=billing_pb.UsageEvent(event_id="before")))
            assert (await stream.read()).event_id == "before"
            router_version = mesh.router_sidecar.certs.version if mesh.kind == "python" else 0

            renewer = asyncio.create_task(renew_certificates(own_pki, lifetime, MESH_SERVICES))
            deadline = time.monotonic() + 20
            while serial_of(served_certificate(mesh.billing_sidecar.inbound_address, own_pki)) == first:
                assert time.monotonic() < deadline, "the certificate was never renewed"
                assert not renewer.done(), renewer
                await asyncio.sleep(0.05)
            renewed = certs.read_pair(own_pki, "billing").cert_pem
            assert certs.not_valid_after(renewed) - dt.datetime.now(dt.UTC) > lifetime / 3

            await stream.write(billing_pb.StreamUsageRequest(event=billing_pb.UsageEvent(event_id="after")))
            assert (await stream.read()).event_id == "after"  # the stream opened before the renewal carries on
            while mesh.kind == "python" and mesh.router_sidecar.certs.version == router_version:
                assert time.monotonic() < deadline, "the router sidecar never loaded its renewed certificate"
                await asyncio.sleep(0.05)
            fresh = stub.StreamUsage(timeout=10)  # a new call, on a new connection with the new certificates
            await fresh.write(billing_pb.StreamUsageRequest(event=billing_pb.UsageEvent(event_id="new")))
            assert (await fresh.read()).event_id == "new"
            await fresh.done_writing()
            await stream.done_writing()
            assert await stream.read() == grpc.aio.EOF
    finally:
        if renewer is not None:
            renewer.cancel()


async def test_certificates_renewed_at_two_thirds_of_their_lifetime_keep_streams_and_reach_new_connections(
        tmp_path: Path, pki: Path, serve) -> None:
    lifetime = dt.timedelta(seconds=6)  # renewed 4 s after issue
    own_pki = short_lived_pki(pki, tmp_path / "pki", lifetime)
    started: list[RunningSidecar] = []
    try:
        mesh = await start_mesh(own_pki, write_policy(tmp_path / "p.yaml", billing_timeout_s=60), serve, started)
        await check_renewal_keeps_streams_and_reaches_new_connections(mesh, own_pki, lifetime)
    finally:
        for running in reversed(started):
            await running.stop(grace=0)


async def test_policy_change_applies_to_new_calls_without_dropping_a_stream(mesh: Mesh) -> None:
    async with mesh.router_outbound() as chan, grpc.aio.insecure_channel(mesh.billing_sidecar.admin_address) as adm:
        admin = admin_grpc.SidecarAdminServiceStub(adm)
        old = await admin.GetConfig(admin_pb.GetConfigRequest(), timeout=5)
        stub = billing_grpc.BillingServiceStub(chan)
        stream = stub.StreamUsage(timeout=30)
        await stream.write(billing_pb.StreamUsageRequest(event=billing_pb.UsageEvent(event_id="before")))
        assert (await stream.read()).event_id == "before"

        doc = yaml.safe_load(mesh.policy.read_text())
        doc["authorization"]["allow"] = [r for r in doc["authorization"]["allow"] if r["to"] != "billing"]
        mesh.policy.write_text(yaml.safe_dump(doc))
        async def reloaded() -> bool:
            return (await admin.GetConfig(admin_pb.GetConfigRequest(), timeout=5)).policy_sha256 != old.policy_sha256

        await wait_until(reloaded, 10, "the billing sidecar to load the edited policy")

        await stream.write(billing_pb.StreamUsageRequest(event=billing_pb.UsageEvent(event_id="after")))
        assert (await stream.read()).event_id == "after"  # the stream in flight carries on
        await stream.done_writing()
        with pytest.raises(grpc.aio.AioRpcError) as err:  # a new call sees the new rules
            new = stub.StreamUsage(timeout=5)
            await new.write(billing_pb.StreamUsageRequest(event=billing_pb.UsageEvent(event_id="x")))
            await new.read()
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_invalid_policy_edit_is_rejected_and_the_old_one_stays(mesh: Mesh) -> None:
    async with grpc.aio.insecure_channel(mesh.inference_sidecar.admin_address) as adm:
        admin = admin_grpc.SidecarAdminServiceStub(adm)
        old = await admin.GetConfig(admin_pb.GetConfigRequest(), timeout=5)
        assert old.identity == "spiffe://autoglm.local/ns/default/sa/inference"
        assert "trust_domain: autoglm.local" in old.policy_yaml
        with capture_logs() as logs:
            mesh.policy.write_text(mesh.policy.read_text().replace("max_attempts: 10", "max_attempts: lots"))
            await wait_until(lambda: any(e["event"] == "policy_reload_rejected" for e in logs), 5,
                             "the sidecar to log policy_reload_rejected", interval=0.02)
        rejected = next(e for e in logs if e["event"] == "policy_reload_rejected")
        assert "max_attempts: expected an integer" in rejected["error"]
        assert (await admin.GetConfig(admin_pb.GetConfigRequest(), timeout=5)).policy_sha256 == old.policy_sha256


@pytest.fixture
def spans() -> InMemorySpanExporter:
    exporter = InMemorySpanExporter()
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        provider = TracerProvider()
        trace.set_tracer_provider(provider)
    provider = trace.get_tracer_provider()
    assert isinstance(provider, TracerProvider)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return exporter


class TraceRouter(router_grpc.RouterServiceServicer):
    """A stand-in router: Generate calls inference through its own sidecar, as the real one does."""

    def __init__(self, outbound: str) -> None:
        self.outbound = outbound

    async def Generate(self, request, context):
        async with grpc.aio.insecure_channel(self.outbound) as chan:
            call = inf_grpc.InferenceServiceStub(chan).Generate(
                inf_pb.GenerateRequest(prompt=request.prompt), metadata=outgoing_metadata(), timeout=5)
            async for piece in call:
                yield router_pb.GenerateResponse(delta=piece.delta)


async def test_one_generate_call_carries_one_trace_id_through_every_hop(mesh: Mesh, serve, spans) -> None:
    def register(server: grpc.aio.Server) -> list[str]:
        router_grpc.add_RouterServiceServicer_to_server(TraceRouter(mesh.router_sidecar.outbound_address), server)
        return ["autoglm.router.v1.RouterService"]

    router_app = await serve(start_server("router", register))
    front = await build_sidecar(SidecarConfig(policy_path=mesh.policy, service="router", certs_dir=mesh.pki,
                                              upstream=router_app.address, outbound_port=None, metrics_port=None))
    try:
        ca = (mesh.pki / "ca.pem").read_bytes()
        with capture_logs() as logs:
            async with grpc.aio.secure_channel(front.inbound_address, grpc.ssl_channel_credentials(ca),
                                               options=[("grpc.ssl_target_name_override", "router")]) as chan:
                call = router_grpc.RouterServiceStub(chan).Generate(router_pb.GenerateRequest(prompt="hi"), timeout=5)
                assert [m.delta async for m in call] == ["tok0 ", "tok1 ", "tok2 "]
    finally:
        await front.stop(grace=0)
    access = [e for e in logs if e["event"] == "access"]
    hops = {(e["sidecar"], e["direction"]) for e in access}
    assert hops == {("router", "inbound"), ("router", "outbound"), ("inference", "inbound")}
    trace_ids = {e["trace_id"] for e in access}
    assert len(trace_ids) == 1
    (trace_id,) = trace_ids
    assert mesh.inference.record.trace_ids == [trace_id]  # the inference service's own logging context
    assert {e.get("trace_id") for e in logs if e["event"] == "access"} == {trace_id}
    finished = spans.get_finished_spans()
    names = {s.name for s in finished if format(s.context.trace_id, "032x") == trace_id}
    assert {"sidecar.inbound autoglm.router.v1.RouterService/Generate",
            "autoglm.router.v1.RouterService/Generate",
            "sidecar.outbound autoglm.inference.v1.InferenceService/Generate",
            "sidecar.inbound autoglm.inference.v1.InferenceService/Generate",
            "autoglm.inference.v1.InferenceService/Generate"} <= names
    assert all(e["status"] == "OK" and e["peer"] in ("", "spiffe://autoglm.local/ns/default/sa/router")
               for e in access)
