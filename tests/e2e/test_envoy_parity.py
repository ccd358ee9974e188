"""Envoy parity: the sidecar integration checks (mTLS, authorization, trace headers, timeouts, retries)
run again with the real Envoy as every sidecar, rendered from the same policy file; grpcurl works
through both kinds of sidecar with -cacert/-cert/-key; every rendered bootstrap passes
`envoy --mode validate`."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import subprocess
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from autoglm.inference.v1 import inference_service_pb2 as pb
from autoglm.inference.v1 import inference_service_pb2_grpc as pb_grpc
from services.common.ports import free_port
from sidecar import certs
from sidecar.envoy_render import EnvoyPorts, render_to_file
from sidecar.runtime import RunningSidecar
from tests.conftest import ROOT, tool
from tests.integration.sidecar.conftest import Mesh, pki, start_mesh, write_policy  # noqa: F401
from tests.integration.sidecar.test_edge_limits import EDGE_POLICY, count
from tests.integration.sidecar.test_sidecar_lifecycle import (
    check_renewal_keeps_streams_and_reaches_new_connections,
    short_lived_pki,
)
from tests.integration.sidecar.test_sidecar_proxy import (  # noqa: F401  (collected again here, on Envoy)
    test_a_caller_supplied_client_identity_never_reaches_the_service_and_the_verified_one_does,
    test_bad_client_certificates_are_refused_at_the_handshake,
    test_bidirectional_stream_is_proxied_message_by_message,
    test_identity_the_policy_does_not_allow_gets_permission_denied,
    test_router_identity_is_allowed_directly_over_mtls,
    test_server_stream_passes_every_message_in_order,
    test_trace_context_and_b3_are_propagated,
    test_trace_context_is_injected_when_missing,
    test_unary_call_crosses_both_sidecars_with_the_answer_intact,
    test_upstream_errors_reach_the_caller_with_code_and_message,
)
from tests.integration.sidecar.test_sidecar_resilience import (  # noqa: F401
    test_client_deadline_shorter_than_the_route_timeout_wins,
    test_half_failing_upstream_succeeds_through_retries_within_budget,
    test_route_timeout_caps_a_longer_client_deadline,
    test_stream_that_delivered_a_message_is_never_retried,
)
from tests.integration.sidecar.upstreams import FakeBilling, FakeInference, start_fake_billing, start_fake_inference
from tests.waiting import wait_until_blocking

pytestmark = pytest.mark.slow


@dataclass
class EnvoySidecar:
    service: str
    ports: EnvoyPorts
    process: subprocess.Popen[bytes]
    config: Path

    @property
    def inbound_address(self) -> str:
        return f"127.0.0.1:{self.ports.inbound}"

    @property
    def outbound_address(self) -> str:
        return f"127.0.0.1:{self.ports.outbound}"

    def admin(self, path: str) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.ports.admin}{path}", timeout=2) as reply:
            return reply.read().decode()


def start_envoy(policy: Path, service: str, pki: Path, upstream: str, peers: dict[str, list[str]], workdir: Path,  # noqa: F811
                processes: list[subprocess.Popen[bytes]]) -> EnvoySidecar:
    log_path = workdir / f"envoy-{service}.log"
    for attempt in range(3):
        # Ports are picked free, then bound by Envoy: another process may take one in between.
        ports = EnvoyPorts(inbound=free_port(), outbound=free_port() if peers else None, admin=free_port())
        config = render_to_file(policy, service, workdir / f"envoy-{service}.yaml", certs_dir=pki, upstream=upstream,
                                peers=peers, ports=ports)
        with log_path.open("wb") as log:
            proc = subprocess.Popen([tool("envoy"), "-c", str(config), "--disable-hot-restart", "-l", "warning",
                                     "--concurrency", "1"], stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        processes.append(proc)
        sidecar = EnvoySidecar(service, ports, proc, config)

        def ready_or_exited(proc: subprocess.Popen[bytes] = proc, sidecar: EnvoySidecar = sidecar) -> bool:
            if proc.poll() is not None:
                return True  # a port taken meanwhile: retried below
            try:
                return sidecar.admin("/ready").strip() == "LIVE"
            except OSError:
                return False

        wait_until_blocking(ready_or_exited, 20, f"envoy ({service}) to report LIVE on /ready")
        if proc.poll() is None:
            return sidecar
        output = log_path.read_text()
        assert "Address already in use" in output and attempt < 2, output[-2000:]
    raise AssertionError("unreachable")


class EnvoyMesh(Mesh):
    async def retry_stats(self) -> dict[str, int]:
        stats: dict[str, int] = {}
        for line in self.router_sidecar.admin("/stats?filter=^cluster.inference.upstream_rq_retry").splitlines():
            name, _, value = line.partition(": ")
            stats[name.rsplit(".", 1)[-1]] = int(value)
        return {"retries": stats.get("upstream_rq_retry", 0), "overflow": stats.get("upstream_rq_retry_overflow", 0)}


async def start_envoy_mesh(pki: Path, policy: Path, serve, processes, workdir: Path) -> Mesh:  # noqa: F811
    fake = FakeInference()
    inference_server = await serve(start_fake_inference(fake))
    billing_server = await serve(start_fake_billing(FakeBilling()))
    loop = asyncio.get_running_loop()

    def start(service: str, upstream: str, peers: dict[str, list[str]]) -> EnvoySidecar:
        return start_envoy(policy, service, pki, upstream, peers, workdir, processes)

    inference = await loop.run_in_executor(None, start, "inference", inference_server.address, {})
    billing = await loop.run_in_executor(None, start, "billing", billing_server.address, {})
    router = await loop.run_in_executor(None, start, "router", "127.0.0.1:1", {
        "inference": [inference.inbound_address], "billing": [billing.inbound_address]})
    return EnvoyMesh(pki, policy, fake, inference_server, billing_server, inference, billing, router, kind="envoy")


@pytest.fixture
async def mesh(pki: Path, tmp_path: Path, serve, processes) -> Mesh:  # noqa: F811
    return await start_envoy_mesh(pki, write_policy(tmp_path / "policy.yaml"), serve, processes, tmp_path)


@pytest.fixture
async def slow_route_mesh(pki: Path, tmp_path: Path, serve, processes) -> Mesh:  # noqa: F811
    return await start_envoy_mesh(pki, write_policy(tmp_path / "policy.yaml", timeout_s=0.3), serve, processes,
                                  tmp_path)


@pytest.mark.parametrize("service", ["router", "inference", "billing"])
def test_every_rendered_bootstrap_passes_envoy_validate(tmp_path: Path, service: str) -> None:
    peers = {"inference": ["127.0.0.1:15071"], "billing": ["127.0.0.1:15061"]} if service == "router" else {}
    certs.init_ca(tmp_path / "certs")
    certs.issue_to(tmp_path / "certs", service)
    config = render_to_file(ROOT / "deploy/policy/mesh-policy.yaml", service, tmp_path / f"{service}.yaml",
                            certs_dir=tmp_path / "certs", upstream="127.0.0.1:50051", peers=peers,
                            ports=EnvoyPorts(15443, 15001 if peers else None, 15000,
                                             http=18443 if service == "router" else None),
                            http_upstream="127.0.0.1:18080" if service == "router" else "")
    result = subprocess.run([tool("envoy"), "--mode", "validate", "-c", str(config)], capture_output=True, text=True,
                            timeout=60, check=False)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "OK" in result.stdout + result.stderr


def test_committed_envoy_configs_pass_envoy_validate(tmp_path: Path) -> None:
    """deploy/envoy/ is rendered with certificates under .autoglm/certs (relative to where Envoy runs)."""
    configs = sorted((ROOT / "deploy/envoy").glob("*.yaml"))
    assert {c.stem for c in configs} == {"router", "inference", "billing"}
    certs.init_ca(tmp_path / ".autoglm/certs")
    for service in ("router", "inference", "billing"):
        certs.issue_to(tmp_path / ".autoglm/certs", service)
    for config in configs:
        result = subprocess.run([tool("envoy"), "--mode", "validate", "-c", str(config)], capture_output=True,
                                text=True, timeout=60, check=False, cwd=tmp_path)
        assert result.returncode == 0, f"{config}: {result.stdout[-1500:]}{result.stderr[-1500:]}"


@pytest.mark.parametrize("kind", ["python", "envoy"])
async def test_grpcurl_works_through_the_sidecar_with_client_certificates(
        kind: str, pki: Path, tmp_path: Path, serve, processes) -> None:  # noqa: F811
    policy = write_policy(tmp_path / "policy.yaml")
    started: list[RunningSidecar] = []
    try:
        if kind == "python":
            mesh = await start_mesh(pki, policy, serve, started)
        else:
            mesh = await start_envoy_mesh(pki, policy, serve, processes, tmp_path)
        argv = [tool("grpcurl"), "-cacert", str(pki / "ca.pem"), "-cert", str(pki / "router.pem"),
                "-key", str(pki / "router.key"), "-servername", "inference",
                "-import-path", str(ROOT / "protos"), "-proto", "autoglm/inference/v1/inference_service.proto",
                "-d", '{"prompt": "one two three four"}', mesh.inference_sidecar.inbound_address,
                "autoglm.inference.v1.InferenceService/CountTokens"]
        result = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE,
                                                      stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(result.communicate(), 30)
        assert result.returncode == 0, err.decode()
        assert json.loads(out)["tokenCount"] == 4
    finally:
        for running in reversed(started):
            await running.stop(grace=0)


async def test_a_trace_started_at_the_envoy_edge_reaches_the_upstream_as_one_trace(mesh: Mesh) -> None:
    """No trace context from the caller: the router's Envoy starts the trace, the inference Envoy continues it,
    and the inference service sees a W3C traceparent of that trace whose parent is the inference Envoy's span."""
    async with mesh.router_outbound() as chan:
        for _ in range(2):
            await pb_grpc.InferenceServiceStub(chan).CountTokens(pb.CountTokensRequest(prompt="a"), timeout=5)
    first, second = mesh.inference.record.metadata[:2]
    version, trace_id, parent_span, flags = first["traceparent"].split("-")
    assert (version, len(trace_id), len(parent_span), flags) == ("00", 32, 16, "01")
    assert int(trace_id, 16) and int(parent_span, 16)
    assert second["traceparent"].split("-")[1] != trace_id  # a new trace per call without context
    assert mesh.inference.record.trace_ids[0] == trace_id  # the service's own span joined that trace
    assert first["x-request-id"] and first["x-request-id"] != second["x-request-id"]


async def test_envoy_reloads_renewed_certificates_through_sds_without_dropping_a_stream(
        pki: Path, tmp_path: Path, serve, processes) -> None:  # noqa: F811
    lifetime = dt.timedelta(seconds=20)  # renewed 13 s after issue: three Envoys start well within that
    own_pki = short_lived_pki(pki, tmp_path / "pki", lifetime)
    mesh = await start_envoy_mesh(own_pki, write_policy(tmp_path / "policy.yaml", billing_timeout_s=60), serve, processes, tmp_path)
    await check_renewal_keeps_streams_and_reaches_new_connections(mesh, own_pki, lifetime)


@pytest.mark.parametrize("authorization", [None, "Basic dXNlcjpwYXNz", "Bearer a,b", "Bearer two words"])
async def test_envoy_refuses_calls_without_a_bearer_token_like_the_python_edge(
        pki: Path, tmp_path: Path, serve, processes, authorization: str | None) -> None:  # noqa: F811
    fake = FakeInference()
    upstream = await serve(start_fake_inference(fake))
    (tmp_path / "policy.yaml").write_text(EDGE_POLICY)
    envoy = await asyncio.get_running_loop().run_in_executor(
        None, start_envoy, tmp_path / "policy.yaml", "inference", pki, upstream.address, {}, tmp_path, processes)
    ca = (pki / "ca.pem").read_bytes()
    async with grpc.aio.secure_channel(envoy.inbound_address, grpc.ssl_channel_credentials(ca),
                                       options=[("grpc.ssl_target_name_override", "inference")]) as chan:
        stub = pb_grpc.InferenceServiceStub(chan)
        metadata = (("authorization", authorization),) if authorization is not None else ()
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.CountTokens(pb.CountTokensRequest(prompt="a"), metadata=metadata, timeout=5)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "authorization: Bearer <API key or JWT>" in (err.value.details() or "")
        assert fake.record.calls == 0
        reply = await stub.CountTokens(pb.CountTokensRequest(prompt="a b"), timeout=5,
                                       metadata=(("authorization", "Bearer ag_key_123"),))
        assert reply.token_count == 2 and fake.record.calls == 1


async def test_envoy_limits_each_caller_separately_like_the_python_edge(
        pki: Path, tmp_path: Path, serve, processes) -> None:  # noqa: F811
    fake = FakeInference()
    upstream = await serve(start_fake_inference(fake))
    (tmp_path / "policy.yaml").write_text(EDGE_POLICY)  # burst 3, then one call per 100 s, per caller
    envoy = await asyncio.get_running_loop().run_in_executor(
        None, start_envoy, tmp_path / "policy.yaml", "inference", pki, upstream.address, {}, tmp_path, processes)
    ca = (pki / "ca.pem").read_bytes()
    async with grpc.aio.secure_channel(envoy.inbound_address, grpc.ssl_channel_credentials(ca),
                                       options=[("grpc.ssl_target_name_override", "inference")]) as chan:
        stub = pb_grpc.InferenceServiceStub(chan)
        flood = [await count(stub, "Bearer ag_flooder_key") for _ in range(10)]
        assert flood[:3] == [grpc.StatusCode.OK] * 3
        assert set(flood[3:]) == {grpc.StatusCode.RESOURCE_EXHAUSTED}
        # Another caller on the same connection, from the same address: its own bucket.
        assert [await count(stub, "Bearer ag_quiet_key") for _ in range(3)] == [grpc.StatusCode.OK] * 3
    assert fake.record.calls == 6
