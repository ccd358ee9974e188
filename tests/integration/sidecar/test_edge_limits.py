"""The public edge: the rate limit is per caller (one caller's flood leaves the others alone), and calls
without a well-formed bearer token are refused at the sidecar before the service sees them."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from autoglm.inference.v1 import inference_service_pb2 as pb
from autoglm.inference.v1 import inference_service_pb2_grpc as pb_grpc
from sidecar.runtime import RunningSidecar, SidecarConfig, build_sidecar
from tests.integration.sidecar.upstreams import FakeInference, start_fake_inference

EDGE_POLICY = """
services:
  inference:
    grpc_services: [autoglm.inference.v1.InferenceService]
    public: true
    require_bearer: true
routes:
  - name: edge
    match: [autoglm.inference.v1.InferenceService/*]
    rate_limit: {rps: 0.01, burst: 3, max_callers: 100}
"""


@pytest.fixture
async def edge(pki: Path, tmp_path: Path, serve) -> AsyncIterator[tuple[RunningSidecar, FakeInference]]:
    fake = FakeInference()
    upstream = await serve(start_fake_inference(fake))
    (tmp_path / "policy.yaml").write_text(EDGE_POLICY)
    running = await build_sidecar(SidecarConfig(policy_path=tmp_path / "policy.yaml", service="inference",
                                                certs_dir=pki, upstream=upstream.address, outbound_port=None,
                                                metrics_port=None))
    try:
        yield running, fake
    finally:
        await running.stop(grace=0)


def public_channel(running: RunningSidecar, pki: Path) -> grpc.aio.Channel:
    """What a client outside the mesh uses: TLS with the mesh CA, no client certificate."""
    return grpc.aio.secure_channel(running.inbound_address,
                                   grpc.ssl_channel_credentials((pki / "ca.pem").read_bytes()),
                                   options=[("grpc.ssl_target_name_override", "inference")])


async def count(stub: pb_grpc.InferenceServiceStub, authorization: str | None) -> grpc.StatusCode:
    metadata = (("authorization", authorization),) if authorization is not None else ()
    try:
        await stub.CountTokens(pb.CountTokensRequest(prompt="a"), metadata=metadata, timeout=5)
    except grpc.aio.AioRpcError as err:
        return err.code()
    return grpc.StatusCode.OK


async def test_a_flood_from_one_caller_does_not_stop_another_callers_requests(edge, pki: Path) -> None:
    running, fake = edge
    async with public_channel(running, pki) as chan:
        stub = pb_grpc.InferenceServiceStub(chan)
        flood = [await count(stub, "Bearer ag_flooder_key") for _ in range(20)]
        assert flood[:3] == [grpc.StatusCode.OK] * 3
        assert set(flood[3:]) == {grpc.StatusCode.RESOURCE_EXHAUSTED}
        # Another caller on the same connection, from the same address: its own bucket.
        assert [await count(stub, "Bearer ag_quiet_key") for _ in range(3)] == [grpc.StatusCode.OK] * 3
    assert fake.record.calls == 6


@pytest.mark.parametrize("authorization", [
    None, "", "Bearer", "Bearer ", "Basic dXNlcjpwYXNz", "Bearer two words", "Bearer ag_%00;drop", "Bearer a,b",
    "Bearer " + "a" * 5000,
])
async def test_calls_without_a_well_formed_bearer_token_are_refused_at_the_edge(
        edge, pki: Path, authorization: str | None) -> None:
    running, fake = edge
    async with public_channel(running, pki) as chan:
        stub = pb_grpc.InferenceServiceStub(chan)
        metadata = (("authorization", authorization),) if authorization is not None else ()
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.CountTokens(pb.CountTokensRequest(prompt="a"), metadata=metadata, timeout=5)
    code, details = err.value.code(), err.value.details() or ""
    assert code == grpc.StatusCode.UNAUTHENTICATED
    assert "authorization: Bearer <API key or JWT>" in details and "spiffe" not in details
    assert fake.record.calls == 0  # the service never saw it


async def test_health_stays_open_without_credentials(edge, pki: Path) -> None:
    running, _ = edge
    async with public_channel(running, pki) as chan:
        reply = await health_pb2_grpc.HealthStub(chan).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
