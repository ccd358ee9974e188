"""Real billing, a real inference replica (the bundled SmolLM2 INT8 model) and the router, in-process."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from autoglm.billing.v1 import billing_service_pb2 as billing_pb2
from autoglm.billing.v1 import billing_service_pb2_grpc as billing_grpc
from autoglm.common.v1 import money_pb2
from autoglm.router.v1 import admin_service_pb2 as admin_pb2
from autoglm.router.v1 import admin_service_pb2_grpc as admin_grpc
from autoglm.router.v1 import router_service_pb2_grpc as router_grpc
from services.billing.config import BillingConfig
from services.billing.server import build_server as build_billing
from services.cli.endpoint import billing_token, operator_channel
from services.common.config import ServerSettings
from services.common.grpc_server import RunningServer
from services.inference.config import InferenceConfig
from services.inference.engine.model import LoadedModel, load_model
from services.inference.server import build_server as build_inference
from services.router.config import RouterConfig
from services.router.server import build_server as build_router

EPHEMERAL = ServerSettings(port=0)
ADMIN_TOKEN = "test-admin-token"
MODEL = "smollm2-135m-instruct"


@pytest.fixture(scope="session")
def loaded_model() -> LoadedModel:
    config = InferenceConfig(server=EPHEMERAL, intra_op_threads=1)
    return load_model(config.model_dir, config.session)


@dataclass
class Mesh:
    billing: RunningServer
    inference: RunningServer
    router: RunningServer
    channel: grpc.aio.Channel
    billing_channel: grpc.aio.Channel
    data_dir: Path

    @property
    def router_stub(self) -> router_grpc.RouterServiceStub:
        return router_grpc.RouterServiceStub(self.channel)

    @property
    def admin(self) -> admin_grpc.AdminServiceStub:
        return admin_grpc.AdminServiceStub(self.channel)

    @property
    def billing_stub(self) -> billing_grpc.BillingServiceStub:
        return billing_grpc.BillingServiceStub(self.billing_channel)

    async def create_key(self, tenant: str = "acme", **fields: object) -> tuple[str, admin_pb2.ApiKey]:
        reply = await self.admin.CreateApiKey(
            admin_pb2.CreateApiKeyRequest(tenant_id=tenant, name="test", **fields),  # type: ignore[arg-type]
            metadata=[("authorization", f"Bearer {ADMIN_TOKEN}")], timeout=10,
        )
        return reply.secret, reply.api_key


async def start_mesh(serve, tmp_path: Path, model: LoadedModel, *, billing_settings: dict[str, object] | None = None,
                     **router_overrides: object) -> Mesh:
    billing = await serve(build_billing(BillingConfig(server=EPHEMERAL, data_dir=tmp_path / "billing",
                                                      **(billing_settings or {}))))  # type: ignore[arg-type]
    inference = await serve(build_inference(InferenceConfig(server=EPHEMERAL, intra_op_threads=1), model=model))
    router = await serve(build_router(RouterConfig(
        server=EPHEMERAL, inference_targets=(inference.address,), billing_target=billing.address,
        data_dir=tmp_path / "router", admin_token=ADMIN_TOKEN, **router_overrides,  # type: ignore[arg-type]
    )))
    billing_channel = operator_channel(billing.address, billing_token(tmp_path / "billing"))
    await billing_grpc.BillingServiceStub(billing_channel).CreatePrice(
        billing_pb2.CreatePriceRequest(price=billing_pb2.Price(
            model=MODEL,
            input_per_million=money_pb2.Money(currency_code="USD", micros=1_000_000),
            output_per_million=money_pb2.Money(currency_code="USD", micros=2_000_000),
        ), actor="test"), timeout=10,
    )
    return Mesh(billing, inference, router, grpc.aio.insecure_channel(router.address), billing_channel,
                tmp_path / "router")


@pytest.fixture
async def mesh(serve, tmp_path: Path, loaded_model: LoadedModel) -> AsyncIterator[Mesh]:
    running = await start_mesh(serve, tmp_path, loaded_model)
    try:
        yield running
    finally:
        await running.channel.close()
        await running.billing_channel.close()
