"""Billing down under load: interactive requests keep succeeding, batch waits (bounded by its deadline)
and runs once billing is back, and then the ledger holds exactly the requests served."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from autoglm.common.v1 import generation_pb2
from autoglm.router.v1 import router_service_pb2 as pb2
from services.billing.config import BillingConfig
from services.billing.server import build_server as build_billing
from services.common.config import ServerSettings
from tests.integration.router.conftest import MODEL, Mesh
from tests.integration.router.test_router_vertical import bearer, settled_rows
from tests.settlement import router_backlog


async def test_usage_is_spooled_while_billing_is_down_and_replayed_exactly(mesh: Mesh, serve, tmp_path) -> None:
    secret, _ = await mesh.create_key("acme")
    batch_secret, _ = await mesh.create_key("acme", traffic_class=generation_pb2.TRAFFIC_CLASS_BATCH)

    def request(i: int) -> pb2.CompleteRequest:
        return pb2.CompleteRequest(model=MODEL, prompt=f"Say {i}.", cache_policy=pb2.CACHE_POLICY_BYPASS,
                                   sampling=generation_pb2.SamplingParams(temperature=0.0, max_tokens=2))

    served = [await mesh.router_stub.Complete(request(0), metadata=bearer(secret), timeout=60)]
    port = mesh.billing.port
    await mesh.billing.stop(grace=0)
    served += await asyncio.gather(*[
        mesh.router_stub.Complete(request(i), metadata=bearer(secret), timeout=60) for i in range(1, 9)])
    assert router_backlog(mesh.data_dir) >= 8  # their usage waits in the router's spool
    with pytest.raises(grpc.aio.AioRpcError) as gave_up:  # batch waits for billing, up to its deadline
        await mesh.router_stub.Complete(request(98), metadata=bearer(batch_secret), timeout=1.0)
    assert gave_up.value.code() == grpc.StatusCode.UNAVAILABLE and "batch" in gave_up.value.details()
    waiting = asyncio.ensure_future(
        mesh.router_stub.Complete(request(99), metadata=bearer(batch_secret), timeout=60))
    served += await asyncio.gather(*[  # interactive traffic goes on while the batch call waits
        mesh.router_stub.Complete(request(i), metadata=bearer(secret), timeout=60) for i in range(9, 12)])
    assert not waiting.done()
    await serve(build_billing(BillingConfig(server=ServerSettings(port=port), data_dir=tmp_path / "billing")))
    served.append(await waiting)  # billing is back: the batch request runs
    report = await settled_rows(mesh, "acme", len(served))  # the spool has replayed and stays empty
    assert report.total.requests == len(served)
    assert report.total.completion_tokens == sum(r.usage.completion_tokens for r in served)
    assert report.total.prompt_tokens == sum(r.usage.prompt_tokens for r in served)
