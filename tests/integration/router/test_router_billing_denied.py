"""The router reaches billing through real sidecars (mTLS, SPIFFE identities, the mesh policy). When the
billing sidecar's policy denies the router's Reserve, callers get INTERNAL with a generic message — not
BUDGET_EXCEEDED, no SPIFFE id, no internal method name — and nothing is served without a hold. A real
budget refusal still crosses both sidecars as RESOURCE_EXHAUSTED with billing's BUDGET_EXCEEDED reason."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from grpc_status import rpc_status

from autoglm.billing.v1 import billing_service_pb2 as billing_pb2
from autoglm.billing.v1 import billing_service_pb2_grpc as billing_grpc
from autoglm.common.v1 import error_details_pb2, generation_pb2, money_pb2
from autoglm.router.v1 import router_service_pb2 as pb2
from services.billing.config import BillingConfig
from services.billing.server import build_server as build_billing
from services.cli.endpoint import billing_token, operator_channel
from services.inference.config import InferenceConfig
from services.inference.engine.model import LoadedModel
from services.inference.server import build_server as build_inference
from services.router.config import RouterConfig
from services.router.server import build_server as build_router
from sidecar import certs
from sidecar.runtime import RunningSidecar, SidecarConfig, build_sidecar
from tests.integration.router.conftest import ADMIN_TOKEN, EPHEMERAL, MODEL, Mesh
from tests.integration.router.test_router_vertical import bearer, usage_rows

BILLING_METHODS = ("ListPrices", "Settle", "Release", "RecordUsage", "CheckBudget")  # everything but Reserve

POLICY = """
version: 1
trust_domain: autoglm.local
namespace: default
services:
  router: {{grpc_services: [autoglm.router.v1.RouterService], public: true}}
  billing: {{grpc_services: [autoglm.billing.v1.BillingService]}}
routes:
  - name: billing
    match: [autoglm.billing.v1.BillingService/*]
    timeout_s: 5
authorization:
  default: deny
  allow:
    - {{from: router, to: billing, methods: [{methods}]}}
"""


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("pki")
    certs.init_ca(directory)
    for service in ("router", "billing"):
        certs.issue_to(directory, service)
    return directory


async def start(serve, tmp_path: Path, model: LoadedModel, pki: Path, methods: list[str],
                sidecars: list[RunningSidecar]) -> Mesh:
    """Billing behind its sidecar, the router's outbound sidecar in front of it, the router calling billing
    through that sidecar (inference directly)."""
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY.format(methods=", ".join(f'"autoglm.billing.v1.BillingService/{m}"' for m in methods)))
    billing = await serve(build_billing(BillingConfig(server=EPHEMERAL, data_dir=tmp_path / "billing")))
    for service, upstream, peers in (("billing", billing.address, {}), ("router", "127.0.0.1:1", None)):
        if peers is None:
            peers = {"billing": [sidecars[0].inbound_address]}
        sidecars.append(await build_sidecar(SidecarConfig(policy_path=policy, service=service, certs_dir=pki,
                                                          upstream=upstream, peers=peers, metrics_port=None)))
    inference = await serve(build_inference(InferenceConfig(server=EPHEMERAL, intra_op_threads=1), model=model))
    router = await serve(build_router(RouterConfig(
        server=EPHEMERAL, inference_targets=(inference.address,), billing_target=sidecars[1].outbound_address,
        data_dir=tmp_path / "router", admin_token=ADMIN_TOKEN)))
    billing_channel = operator_channel(billing.address, billing_token(tmp_path / "billing"))
    await billing_grpc.BillingServiceStub(billing_channel).CreatePrice(billing_pb2.CreatePriceRequest(
        price=billing_pb2.Price(model=MODEL, input_per_million=money_pb2.Money(currency_code="USD", micros=1_000_000),
                                output_per_million=money_pb2.Money(currency_code="USD", micros=2_000_000)),
        actor="test"), timeout=10)
    return Mesh(billing, inference, router, grpc.aio.insecure_channel(router.address), billing_channel,
                tmp_path / "router")


@pytest.fixture
async def through_sidecars(request: pytest.FixtureRequest, serve, tmp_path: Path, loaded_model: LoadedModel,
                           pki: Path) -> AsyncIterator[Mesh]:
    sidecars: list[RunningSidecar] = []
    try:
        mesh = await start(serve, tmp_path, loaded_model, pki, request.param, sidecars)
        try:
            yield mesh
        finally:
            await mesh.channel.close()
            await mesh.billing_channel.close()
    finally:
        for running in reversed(sidecars):
            await running.stop(grace=0)


def one_token() -> pb2.CompleteRequest:
    return pb2.CompleteRequest(model=MODEL, prompt="Hi", raw_prompt=True, cache_policy=pb2.CACHE_POLICY_BYPASS,
                               sampling=generation_pb2.SamplingParams(temperature=0.0, max_tokens=1))


def reason_of(error: grpc.aio.AioRpcError) -> str:
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorDetail.DESCRIPTOR):
            unpacked = error_details_pb2.ErrorDetail()
            detail.Unpack(unpacked)
            return unpacked.reason
    return ""


@pytest.mark.parametrize("through_sidecars", [list(BILLING_METHODS)], indirect=True)
async def test_a_mesh_policy_denial_of_billing_is_internal_not_budget_exceeded_and_names_nothing_inside(
        through_sidecars: Mesh) -> None:
    mesh = through_sidecars
    secret, _ = await mesh.create_key("acme")
    for _ in range(3):  # refused every time: a denial is not an outage, so no offline hold is ever granted
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await mesh.router_stub.Complete(one_token(), metadata=bearer(secret), timeout=30)
        error = refused.value
        assert error.code() == grpc.StatusCode.INTERNAL, error.details()
        assert reason_of(error) == "INTERNAL"
        text = error.details() or ""
        assert "spiffe://" not in text and "/autoglm." not in text and "BillingService" not in text
        assert "Reserve" not in text and "mesh policy" not in text
    assert (await usage_rows(mesh, "acme")).total.requests == 0  # nothing was served without a hold


@pytest.mark.parametrize("through_sidecars", [["*"]], indirect=True)
async def test_a_budget_refusal_crosses_the_sidecars_as_budget_exceeded(through_sidecars: Mesh) -> None:
    mesh = through_sidecars
    await mesh.billing_stub.CreateBudget(billing_pb2.CreateBudgetRequest(budget=billing_pb2.Budget(
        scope=billing_pb2.BudgetScope(kind=billing_pb2.SCOPE_KIND_TENANT, tenant_id="broke"),
        period=billing_pb2.BudgetPeriod(kind=billing_pb2.PERIOD_KIND_DAILY),
        amount=money_pb2.Money(currency_code="USD", micros=1), enforcement=billing_pb2.ENFORCEMENT_HARD,
    ), actor="test"), timeout=10)
    secret, _ = await mesh.create_key("broke")
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await mesh.router_stub.Complete(one_token(), metadata=bearer(secret), timeout=30)
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, refused.value.details()
    assert reason_of(refused.value) == "BUDGET_EXCEEDED"
