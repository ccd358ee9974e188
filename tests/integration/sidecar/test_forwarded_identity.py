"""Billing trusts the caller identity its sidecar forwards (`trust_forwarded_identity`) because the sidecar
never lets a caller's own `x-forwarded-client-cert` through: it sets the header from the peer certificate
its mTLS handshake verified. A router that claims to be an operator is recorded as the router."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from autoglm.billing.v1 import billing_service_pb2 as pb2
from autoglm.billing.v1 import billing_service_pb2_grpc as pb2_grpc
from services.billing.config import BillingConfig
from services.billing.server import build_server
from services.common.config import ServerSettings
from sidecar.runtime import RunningSidecar, SidecarConfig, build_sidecar
from tests.integration.billing.helpers import OPERATOR_TOKEN, price_request
from tests.integration.sidecar.conftest import client_credentials, mtls_channel, pki, write_policy  # noqa: F401

OPS = "spiffe://autoglm.local/ns/default/sa/operator"
ROUTER = "spiffe://autoglm.local/ns/default/sa/router"
FORGED = (("x-forwarded-client-cert", f"By=spiffe://autoglm.local/ns/default/sa/billing;URI={OPS}"),)


async def test_billing_behind_its_sidecar_sees_the_verified_identity_never_the_one_a_caller_wrote(
        serve, pki: Path, tmp_path: Path) -> None:  # noqa: F811
    billing = await serve(build_server(BillingConfig(
        server=ServerSettings(port=0), data_dir=tmp_path, database=f"sqlite:///{tmp_path / 'b.db'}",
        operator_token=OPERATOR_TOKEN, operator_identities=(OPS, ROUTER), trust_forwarded_identity=True)))
    sidecar: RunningSidecar = await build_sidecar(SidecarConfig(
        policy_path=write_policy(tmp_path / "policy.yaml"), service="billing", certs_dir=pki,
        upstream=billing.address, peers={}, metrics_port=None))
    try:
        async with mtls_channel(sidecar.inbound_address, client_credentials(pki, "router"), "billing") as chan:
            stub = pb2_grpc.BillingServiceStub(chan)
            await stub.CreatePrice(price_request(), metadata=FORGED, timeout=10)
            events = (await stub.ListAuditEvents(pb2.ListAuditEventsRequest(action="price.create"),
                                                 metadata=FORGED, timeout=10)).events
        assert [e.actor for e in events] == [ROUTER], "the audit actor is the verified peer, not the claim"
        async with grpc.aio.insecure_channel(billing.address) as direct:  # the header itself is what billing trusts
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await pb2_grpc.BillingServiceStub(direct).ListAuditEvents(
                    pb2.ListAuditEventsRequest(), timeout=10,
                    metadata=(("x-forwarded-client-cert", "URI=spiffe://autoglm.local/ns/default/sa/inference"),))
        assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    finally:
        await sidecar.stop(grace=0)
