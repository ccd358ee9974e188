"""Engine-side metering from a real replica (the real model) to a real billing server: finished
sequences wait in the replica's buffer while billing is down (counted), reach billing once it is up,
and are billed from the records, marked "engine", with the replica's token counts and the caller the
request named; a request without a tenant is not reported."""

from __future__ import annotations

import time

from prometheus_client import REGISTRY

from autoglm.billing.v1 import billing_service_pb2 as bpb2
from autoglm.billing.v1 import billing_service_pb2_grpc as bpb2_grpc
from autoglm.inference.v1 import inference_service_pb2 as pb2
from services.billing.config import BillingConfig
from services.billing.server import build_server as build_billing
from services.common.config import ServerSettings
from services.common.ports import free_port
from tests.integration.billing.helpers import OPERATOR_TOKEN, operator, price_request
from tests.integration.inference.helpers import generate, request
from tests.waiting import wait_until

REPLICA = "inference-metering"


def buffered() -> float:
    return REGISTRY.get_sample_value("autoglm_inference_usage_records_buffered", {"replica": REPLICA}) or 0.0


def failures() -> float:
    return REGISTRY.get_sample_value("autoglm_inference_usage_report_failures_total", {"replica": REPLICA}) or 0.0


def attributed(prompt: str, max_tokens: int, request_id: str, tenant: str = "acme") -> pb2.GenerateRequest:
    req = request(prompt, max_tokens, temperature=0.0)
    req.request_id, req.tenant_id, req.api_key_id = request_id, tenant, "k1"
    req.model, req.model_version, req.router_id = "smollm2", "v1", "router-test"
    req.tags["team"] = "search"
    return req


async def test_records_wait_while_billing_is_down_then_are_billed_with_the_replicas_counts(
        inference, serve, tmp_path) -> None:
    port = free_port()
    stub = await inference(replica_id=REPLICA, billing=f"127.0.0.1:{port}", usage_flush_s=0)
    failed_before = failures()
    done = await generate(stub, attributed("Say hi.", 4, "m-done"))
    cut = stub.Generate(attributed("Count from one to fifty.", 64, "m-cut"), timeout=120)
    got = 0
    async for message in cut:
        got += len(message.token_ids)
        if got >= 2:
            break
    cut.cancel()
    await generate(stub, request("Say hi.", 2))  # no tenant: not reported
    await wait_until(lambda: buffered() >= 2 and failures() > failed_before, 60,
                     "the records to wait in the buffer while billing is down")

    billing = await serve(build_billing(BillingConfig(
        server=ServerSettings(port=port), database=f"sqlite:///{tmp_path / 'billing.sqlite3'}",
        operator_token=OPERATOR_TOKEN, engine_grace_s=0, engine_reconcile_s=0.05)))
    async with operator(billing) as chan:
        bstub = bpb2_grpc.BillingServiceStub(chan)
        await bstub.CreatePrice(price_request())

        async def rows() -> dict[str, bpb2.UsageReportRow] | None:
            report = await bstub.GetUsageReport(bpb2.GetUsageReportRequest(
                start_time={"seconds": 0}, end_time={"seconds": int(time.time()) + 60},
                group_by=[bpb2.REPORT_DIMENSION_STATUS, bpb2.REPORT_DIMENSION_SOURCE,
                          bpb2.REPORT_DIMENSION_API_KEY, bpb2.REPORT_DIMENSION_TAG], tag_key="team"))
            found = {row.group["status"]: row for row in report.rows}
            return found if report.total.requests >= 2 else None

        billed = await wait_until(rows, 60, "billing to bill both records")
    assert sorted(billed) == ["cancelled", "completed"]
    usage = done.last.usage
    assert (billed["completed"].prompt_tokens, billed["completed"].completion_tokens) == \
        (usage.prompt_tokens, usage.completion_tokens)
    assert billed["cancelled"].completion_tokens >= 2
    for row in billed.values():
        assert (row.requests, dict(row.group)["source"], row.group["api_key"], row.group["tag"]) == \
            (1, "engine", "k1", "search")
    assert buffered() == 0
