"""A replica that answers with a fault of its own (INTERNAL, not a transport failure) is not retried on
another replica of the same version: callers get INTERNAL with a generic message; a canary that does
this counts it against its error ratio, is rolled back, and its callers are answered by stable."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration

from autoglm.billing.v1 import billing_service_pb2 as billing_pb2
from autoglm.common.v1 import generation_pb2, money_pb2
from autoglm.inference.v1 import inference_service_pb2 as inference_pb2
from autoglm.router.v1 import admin_service_pb2 as admin_pb2
from autoglm.router.v1 import router_service_pb2 as pb2
from services.common.grpc_server import RunningServer
from tests.integration.router.conftest import ADMIN_TOKEN, MODEL, Mesh
from tests.integration.router.test_router_vertical import bearer
from tests.integration.sidecar.upstreams import FakeInference, start_fake_inference

ADMIN = [("authorization", f"Bearer {ADMIN_TOKEN}")]
FAULT = "tensor shape mismatch in layer 7"


class BrokenReplica(FakeInference):
    """A real InferenceService whose every generation fails inside the replica (answered as INTERNAL)."""

    generations = 0

    async def Generate(self, request: inference_pb2.GenerateRequest, context: grpc.aio.ServicerContext
                       ) -> AsyncIterator[inference_pb2.GenerateResponse]:
        self.generations += 1
        raise RuntimeError(FAULT)
        yield  # an async generator, like the real servicer's


def one_token(prompt: str, model: str = MODEL) -> pb2.CompleteRequest:
    return pb2.CompleteRequest(model=model, prompt=prompt, cache_policy=pb2.CACHE_POLICY_BYPASS,
                               sampling=generation_pb2.SamplingParams(temperature=0.0, max_tokens=1))


async def broken_replica(serve) -> tuple[BrokenReplica, RunningServer]:
    replica = BrokenReplica()
    return replica, await serve(start_fake_inference(replica))


async def test_a_replicas_internal_fault_is_not_retried_on_its_sibling_and_reaches_the_caller_generically(
        mesh: Mesh, serve) -> None:
    (first, first_server), (second, second_server) = await broken_replica(serve), await broken_replica(serve)
    await mesh.admin.RegisterModelVersion(admin_pb2.RegisterModelVersionRequest(
        model="broken", version="v1", replicas=[admin_pb2.Replica(address=first_server.address),
                                                admin_pb2.Replica(address=second_server.address)],
    ), metadata=ADMIN, timeout=10)
    await mesh.billing_stub.CreatePrice(billing_pb2.CreatePriceRequest(price=billing_pb2.Price(
        model="broken", input_per_million=money_pb2.Money(currency_code="USD", micros=1),
        output_per_million=money_pb2.Money(currency_code="USD", micros=1)), actor="test"), timeout=10)
    secret, _ = await mesh.create_key("acme")
    for index in range(4):
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await mesh.router_stub.Complete(one_token(f"Say {index}.", "broken"), metadata=bearer(secret), timeout=30)
        assert failed.value.code() == grpc.StatusCode.INTERNAL, failed.value.details()
        text = failed.value.details() or ""
        assert FAULT not in text and first_server.address not in text and second_server.address not in text
        assert first.generations + second.generations == index + 1  # one replica tried, its sibling spared


async def test_a_canary_answering_internal_is_rolled_back_and_its_callers_get_stable(mesh: Mesh, serve) -> None:
    canary, canary_server = await broken_replica(serve)
    await mesh.admin.RegisterModelVersion(admin_pb2.RegisterModelVersionRequest(
        model=MODEL, version="canary", replicas=[admin_pb2.Replica(address=canary_server.address)],
        canary_policy=admin_pb2.CanaryPolicy(max_error_permille=50, window=Duration(seconds=60), min_requests=3),
    ), metadata=ADMIN, timeout=10)
    model = (await mesh.admin.GetModel(admin_pb2.GetModelRequest(model=MODEL), metadata=ADMIN, timeout=10)).model
    stable = next(v.version for v in model.versions if v.stable)
    await mesh.admin.SetTrafficSplit(admin_pb2.SetTrafficSplitRequest(model=MODEL, weights=[
        admin_pb2.VersionWeight(version=stable, weight_permille=500),
        admin_pb2.VersionWeight(version="canary", weight_permille=500)]), metadata=ADMIN, timeout=10)
    secret, _ = await mesh.create_key("acme")
    for index in range(12):
        reply = await mesh.router_stub.Complete(one_token(f"Say {index}."), metadata=bearer(secret), timeout=60)
        assert reply.model_version == stable
    model = (await mesh.admin.GetModel(admin_pb2.GetModelRequest(model=MODEL), metadata=ADMIN, timeout=10)).model
    assert {v.version: v.weight_permille for v in model.versions} == {stable: 1000, "canary": 0}
    assert canary.generations >= 3
