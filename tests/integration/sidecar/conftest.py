"""Fixtures for the sidecar suite: a throw-away PKI, a policy file, and a small mesh of real processes'
worth of parts in-process: fake inference/billing upstreams, each behind a sidecar, and a "router"
sidecar whose outbound listener a test calls as the router would."""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from services.common.grpc_server import RunningServer
from sidecar import certs
from sidecar.runtime import RunningSidecar, SidecarConfig, build_sidecar
from tests.integration.sidecar.upstreams import FakeBilling, FakeInference, start_fake_billing, start_fake_inference

POLICY_TEMPLATE = """
version: 1
trust_domain: autoglm.local
namespace: default
services:
  router: {{grpc_services: [autoglm.router.v1.RouterService], public: true}}
  inference:
    grpc_services: [autoglm.inference.v1.InferenceService]
    retry_budget: {{ratio: {budget_ratio}, min_per_s: {budget_floor}}}
    circuit_breaker: {{consecutive_failures: 3, failure_ratio: 0.9, window_s: 10, min_requests: 1000,
                      open_s: 0.3, half_open_probes: 1}}
    outlier: {{consecutive_failures: 1000, base_ejection_s: 1, max_ejection_percent: 50}}
  billing: {{grpc_services: [autoglm.billing.v1.BillingService]}}
routes:
  - name: generate
    match: [autoglm.inference.v1.InferenceService/Generate]
    timeout_s: 5
    retries: {{retry_on: [UNAVAILABLE], max_attempts: 10, backoff: {{base_s: 0.001, max_s: 0.004}}}}
  - name: inference
    match: [autoglm.inference.v1.InferenceService/*]
    timeout_s: {timeout_s}
    retries: {{retry_on: [UNAVAILABLE], max_attempts: 10, backoff: {{base_s: 0.001, max_s: 0.004}}}}
  - name: billing
    match: [autoglm.billing.v1.BillingService/*]
    timeout_s: {billing_timeout_s}
authorization:
  default: deny
  allow:
    - {{from: router, to: inference, methods: ["autoglm.inference.v1.InferenceService/*"]}}
    - {{from: router, to: billing, methods: ["autoglm.billing.v1.BillingService/*"]}}
"""


def write_policy(path: Path, *, timeout_s: float = 5.0, budget_ratio: float = 1.0, budget_floor: float = 10,
                 billing_timeout_s: float = 5.0) -> Path:
    path.write_text(POLICY_TEMPLATE.format(timeout_s=timeout_s, budget_ratio=budget_ratio,
                                           budget_floor=budget_floor, billing_timeout_s=billing_timeout_s))
    return path


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """ca + router/inference/billing certs, plus: `rogue` (a router identity from another CA) and
    `expired` (a router identity that expired an hour ago) under pki/bad/."""
    directory = tmp_path_factory.mktemp("pki")
    certs.init_ca(directory)
    for service in ("router", "inference", "billing"):
        certs.issue_to(directory, service)
    bad = directory / "bad"
    other_ca = certs.make_ca("some other CA")
    certs.write_pair(bad, "rogue", certs.issue(other_ca, "router"))
    ca = certs.read_pair(directory, "ca")
    past = dt.datetime.now(dt.UTC) - dt.timedelta(hours=3)
    certs.write_pair(bad, "expired", certs.issue(ca, "router", ttl=dt.timedelta(hours=1), now=past))
    return directory


def client_credentials(pki: Path, cert: str | None, key_dir: Path | None = None) -> grpc.ChannelCredentials:
    ca = (pki / "ca.pem").read_bytes()
    if cert is None:
        return grpc.ssl_channel_credentials(root_certificates=ca)
    directory = key_dir or pki
    return grpc.ssl_channel_credentials(root_certificates=ca, private_key=(directory / f"{cert}.key").read_bytes(),
                                        certificate_chain=(directory / f"{cert}.pem").read_bytes())


def mtls_channel(address: str, credentials: grpc.ChannelCredentials, service: str) -> grpc.aio.Channel:
    return grpc.aio.secure_channel(address, credentials, options=[("grpc.ssl_target_name_override", service)])


@dataclass
class Mesh:
    """Fake upstreams behind sidecars. The sidecars are Python ones (RunningSidecar) here; the Envoy
    parity suite fills the same fields with Envoy processes that have the same addresses."""

    pki: Path
    policy: Path
    inference: FakeInference
    inference_server: RunningServer
    billing_server: RunningServer
    inference_sidecar: Any
    billing_sidecar: Any
    router_sidecar: Any
    kind: str = "python"

    async def retry_stats(self) -> dict[str, int]:
        """Retries the router's sidecar made to inference, and retries its budget refused."""
        budget = self.router_sidecar._clusters[1].budget
        return {"retries": budget.retries_total, "overflow": budget.denied_total,
                "max_active": budget.max_active_retries}

    def router_outbound(self) -> grpc.aio.Channel:
        """The channel the router uses to reach its peers: plaintext to its own sidecar."""
        return grpc.aio.insecure_channel(self.router_sidecar.outbound_address)

    def inference_inbound(self, cert: str | None, key_dir: Path | None = None) -> grpc.aio.Channel:
        """A direct mTLS channel to the inference sidecar, presenting `cert` (None: no client cert)."""
        return mtls_channel(self.inference_sidecar.inbound_address, client_credentials(self.pki, cert, key_dir),
                            "inference")


async def start_mesh(pki: Path, policy: Path, serve, started: list[RunningSidecar]) -> Mesh:
    fake = FakeInference()
    inference_server = await serve(start_fake_inference(fake))
    billing_server = await serve(start_fake_billing(FakeBilling()))

    async def sidecar(service: str, upstream: str, peers: dict[str, list[str]]) -> RunningSidecar:
        running = await build_sidecar(SidecarConfig(policy_path=policy, service=service, certs_dir=pki,
                                                    upstream=upstream, peers=peers, metrics_port=None,
                                                    watch_interval_s=0.05))
        started.append(running)
        return running

    inference_sidecar = await sidecar("inference", inference_server.address, {})
    billing_sidecar = await sidecar("billing", billing_server.address, {})
    router_sidecar = await sidecar("router", "127.0.0.1:1", {
        "inference": [inference_sidecar.inbound_address], "billing": [billing_sidecar.inbound_address]})
    return Mesh(pki, policy, fake, inference_server, billing_server, inference_sidecar, billing_sidecar,
                router_sidecar)


@pytest.fixture
async def mesh(pki: Path, tmp_path: Path, serve) -> AsyncIterator[Mesh]:
    started: list[RunningSidecar] = []
    try:
        yield await start_mesh(pki, write_policy(tmp_path / "policy.yaml"), serve, started)
    finally:
        for running in reversed(started):
            await running.stop(grace=0)
