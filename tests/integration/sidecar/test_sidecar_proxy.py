"""Calls through the sidecars: unary and streaming calls forwarded as bytes over mTLS, authorization by
SPIFFE identity, trace context injected or propagated, deadlines and cancellation carried both ways."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from autoglm.billing.v1 import billing_service_pb2 as billing_pb
from autoglm.billing.v1 import billing_service_pb2_grpc as billing_grpc
from autoglm.inference.v1 import inference_service_pb2 as pb
from autoglm.inference.v1 import inference_service_pb2_grpc as pb_grpc
from services.billing.operators import forwarded_uri
from tests.integration.sidecar.conftest import Mesh
from tests.waiting import wait_until

TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


async def test_unary_call_crosses_both_sidecars_with_the_answer_intact(mesh: Mesh) -> None:
    async with mesh.router_outbound() as chan:
        reply = await pb_grpc.InferenceServiceStub(chan).CountTokens(
            pb.CountTokensRequest(prompt="one two three"), timeout=5)
    assert reply.token_count == 3
    assert mesh.inference.record.calls == 1


async def test_server_stream_passes_every_message_in_order(mesh: Mesh) -> None:
    mesh.inference.behaviour.messages = 50
    async with mesh.router_outbound() as chan:
        call = pb_grpc.InferenceServiceStub(chan).Generate(pb.GenerateRequest(prompt="hi"), timeout=5)
        deltas = [m.delta async for m in call]
    assert deltas == [f"tok{i} " for i in range(50)]


async def test_bidirectional_stream_is_proxied_message_by_message(mesh: Mesh) -> None:
    async with mesh.router_outbound() as chan:
        call = billing_grpc.BillingServiceStub(chan).StreamUsage(timeout=5)
        acks = []
        for i in range(5):
            await call.write(billing_pb.StreamUsageRequest(event=billing_pb.UsageEvent(event_id=f"e{i}")))
            acks.append((await call.read()).event_id)  # one answer before the next request: no buffering
        await call.done_writing()
        assert await call.read() == grpc.aio.EOF
    assert acks == [f"e{i}" for i in range(5)]


async def test_router_identity_is_allowed_directly_over_mtls(mesh: Mesh) -> None:
    async with mesh.inference_inbound("router") as chan:
        reply = await pb_grpc.InferenceServiceStub(chan).CountTokens(pb.CountTokensRequest(prompt="a b"), timeout=5)
    assert reply.token_count == 2


async def test_identity_the_policy_does_not_allow_gets_permission_denied(mesh: Mesh) -> None:
    async with mesh.inference_inbound("billing") as chan:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await pb_grpc.InferenceServiceStub(chan).CountTokens(pb.CountTokensRequest(prompt="a"), timeout=5)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    if mesh.kind == "python":  # Envoy's RBAC filter says only "RBAC: access denied"
        assert "spiffe://autoglm.local/ns/default/sa/billing" in (err.value.details() or "")
    assert mesh.inference.record.calls == 0


@pytest.mark.parametrize("cert", [None, "rogue", "expired"], ids=["no-client-cert", "other-ca", "expired"])
async def test_bad_client_certificates_are_refused_at_the_handshake(mesh: Mesh, cert: str | None) -> None:
    key_dir = mesh.pki / "bad" if cert else None
    async with mesh.inference_inbound(cert, key_dir) as chan:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await pb_grpc.InferenceServiceStub(chan).CountTokens(pb.CountTokensRequest(prompt="a"), timeout=3)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert mesh.inference.record.calls == 0


async def test_trace_context_is_injected_when_missing(mesh: Mesh) -> None:
    async with mesh.router_outbound() as chan:
        await pb_grpc.InferenceServiceStub(chan).CountTokens(pb.CountTokensRequest(prompt="a"), timeout=5)
    seen = mesh.inference.record.metadata[0]
    assert len(seen["traceparent"].split("-")[1]) == 32
    assert seen["x-request-id"]


async def test_trace_context_and_b3_are_propagated(mesh: Mesh) -> None:
    metadata = (("traceparent", TRACEPARENT), ("tracestate", "vendor=1"), ("x-request-id", "req-42"),
                ("x-b3-traceid", "80f198ee56343ba864fe8b2a57d3eff7"), ("x-b3-sampled", "1"), ("x-tenant", "acme"))
    async with mesh.router_outbound() as chan:
        await pb_grpc.InferenceServiceStub(chan).CountTokens(pb.CountTokensRequest(prompt="a"), timeout=5,
                                                              metadata=metadata)
    seen = mesh.inference.record.metadata[0]
    assert seen["traceparent"].split("-")[1] == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert seen["tracestate"] == "vendor=1"
    assert seen["x-request-id"] == "req-42"
    assert seen["x-b3-traceid"] == "80f198ee56343ba864fe8b2a57d3eff7"
    assert seen["x-tenant"] == "acme"
    assert mesh.inference.record.trace_ids[0] == "4bf92f3577b34da6a3ce929d0e0e4736"


FORGED_IDENTITY = "By=spiffe://autoglm.local/ns/default/sa/inference;URI=spiffe://autoglm.local/ns/default/sa/billing"


async def test_a_caller_supplied_client_identity_never_reaches_the_service_and_the_verified_one_does(
        mesh: Mesh) -> None:
    """The inbound sidecar drops any `x-forwarded-client-cert` a caller sent and sets its own, naming the
    peer its mTLS handshake verified, so a service (billing's `trust_forwarded_identity`) may trust it."""
    forged = (("x-forwarded-client-cert", FORGED_IDENTITY),)
    async with mesh.router_outbound() as chan:  # the router itself claims to be billing
        await pb_grpc.InferenceServiceStub(chan).CountTokens(pb.CountTokensRequest(prompt="a"), timeout=5,
                                                              metadata=forged)
    async with mesh.inference_inbound("router") as chan:  # a peer with the router's certificate claims it
        await pb_grpc.InferenceServiceStub(chan).CountTokens(pb.CountTokensRequest(prompt="a"), timeout=5,
                                                              metadata=forged)
    assert len(mesh.inference.record.forwarded_certs) == 2
    for values in mesh.inference.record.forwarded_certs:
        assert len(values) == 1 and "sa/billing" not in values[0], values
        assert forwarded_uri(values[0]) == "spiffe://autoglm.local/ns/default/sa/router"
        assert values[0].startswith("By=spiffe://autoglm.local/ns/default/sa/inference;")


async def test_upstream_errors_reach_the_caller_with_code_and_message(mesh: Mesh) -> None:
    mesh.inference.behaviour.fail_ratio = 1.0
    async with mesh.router_outbound() as chan:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await pb_grpc.InferenceServiceStub(chan).CountTokens(pb.CountTokensRequest(prompt="a"), timeout=5)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert err.value.details() == "replica overloaded (test)"


async def test_client_cancellation_cancels_the_upstream_call(mesh: Mesh) -> None:
    mesh.inference.behaviour.hang = True
    async with mesh.router_outbound() as chan:
        call = pb_grpc.InferenceServiceStub(chan).Generate(pb.GenerateRequest(prompt="hi"), timeout=30)
        await asyncio.wait_for(mesh.inference.record.hanging.wait(), 5)
        call.cancel()
        await wait_until(lambda: mesh.inference.record.cancelled, 5, "the upstream call to be cancelled",
                         interval=0.01)
    assert mesh.inference.record.cancelled == 1


async def test_unknown_service_gets_unimplemented_naming_the_gap(mesh: Mesh) -> None:
    async with mesh.router_outbound() as chan:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await chan.unary_unary("/no.such.v1.Service/Call")(b"", timeout=5)
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert "no.such.v1.Service" in (err.value.details() or "")
