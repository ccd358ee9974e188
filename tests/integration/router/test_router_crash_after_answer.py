"""The router answers with the cost as soon as it is known and settles with billing just after. A router
SIGKILLed in between (billing frozen with SIGSTOP, so the settle cannot have landed) still bills the
request exactly once: the event was journaled before the answer and is replayed at the next start."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import grpc

from autoglm.billing.v1 import billing_service_pb2 as billing_pb2
from autoglm.billing.v1 import billing_service_pb2_grpc as billing_grpc
from autoglm.common.v1 import generation_pb2, money_pb2
from autoglm.router.v1 import admin_service_pb2 as admin_pb2
from autoglm.router.v1 import admin_service_pb2_grpc as admin_grpc
from autoglm.router.v1 import router_service_pb2 as pb2
from autoglm.router.v1 import router_service_pb2_grpc as router_grpc
from services.cli.endpoint import billing_token, operator_channel
from tests.integration.router.conftest import ADMIN_TOKEN, MODEL
from tests.integration.router.service_process import drain, start_service, stop
from tests.integration.router.test_router_vertical import bearer, settled_rows


class BillingOnly:
    """What `settled_rows` needs of a mesh: billing's stub and the router's data dir."""

    def __init__(self, stub: billing_grpc.BillingServiceStub, data_dir: Path) -> None:
        self.billing_stub = stub
        self.data_dir = data_dir


def start_router(tmp_path: Path, inference: str, billing: str, processes: list) -> tuple:  # type: ignore[type-arg]
    config = tmp_path / "mesh.yaml"
    config.write_text(json.dumps({"router": {"admin_token": ADMIN_TOKEN, "data_dir": str(tmp_path / "router")}}))
    proc, address = start_service("router", ["--config", str(config), "--inference", inference,
                                             "--billing", billing], processes)
    drain(proc)
    return proc, address


async def test_a_router_killed_between_answer_and_settle_bills_the_request_once(tmp_path: Path) -> None:
    processes: list = []
    billing_proc = None
    try:
        billing_proc, billing = start_service("billing", ["--data-dir", str(tmp_path / "billing")], processes)
        drain(billing_proc)
        inference_proc, inference = start_service("inference", ["--replica-id", "r1", "--threads", "1"], processes)
        drain(inference_proc)
        billing_channel = operator_channel(billing, billing_token(tmp_path / "billing"))
        billing_stub = billing_grpc.BillingServiceStub(billing_channel)
        await billing_stub.CreatePrice(billing_pb2.CreatePriceRequest(price=billing_pb2.Price(
            model=MODEL, input_per_million=money_pb2.Money(currency_code="USD", micros=1_000_000),
            output_per_million=money_pb2.Money(currency_code="USD", micros=2_000_000)), actor="test"), timeout=10)
        router_proc, router = start_router(tmp_path, inference, billing, processes)
        channel = grpc.aio.insecure_channel(router)
        key = await admin_grpc.AdminServiceStub(channel).CreateApiKey(
            admin_pb2.CreateApiKeyRequest(tenant_id="killed"), metadata=[("authorization", f"Bearer {ADMIN_TOKEN}")],
            timeout=10)

        call = router_grpc.RouterServiceStub(channel).Generate(pb2.GenerateRequest(
            model=MODEL, prompt="Write a long story about a lighthouse.", cache_policy=pb2.CACHE_POLICY_BYPASS,
            sampling=generation_pb2.SamplingParams(temperature=0.0, max_tokens=24)), metadata=bearer(key.secret),
            timeout=60)
        received, last = 0, None
        async for reply in call:
            if received == 0:
                os.kill(billing_proc.pid, signal.SIGSTOP)  # the hold is taken; now billing hears nothing
            received += reply.delta_tokens
            last = reply
        assert last is not None and last.summary.usage.completion_tokens == received and last.summary.cost.micros > 0
        # The answer is out, the settle is stuck on the frozen billing: kill the router now.
        router_proc.kill()
        router_proc.wait()
        os.kill(billing_proc.pid, signal.SIGCONT)
        await channel.close()

        start_router(tmp_path, inference, billing, processes)  # same data dir
        report = await settled_rows(BillingOnly(billing_stub, tmp_path / "router"), "killed")  # type: ignore[arg-type]
        assert report.total.requests == 1
        [row] = report.rows
        assert row.completion_tokens == received
        assert report.total.cost.micros == last.summary.cost.micros
        await billing_channel.close()
    finally:
        if billing_proc is not None and billing_proc.poll() is None:
            os.kill(billing_proc.pid, signal.SIGCONT)
        stop(processes)
