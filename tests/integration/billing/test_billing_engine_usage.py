"""ReportEngineUsage over real gRPC, on SQLite and PostgreSQL: replicas' records are kept after the commit,
reconciled with routers' events by request id, billed once (marked "engine") when no router event came,
and a router event arriving after that is a duplicate — never both; bad records are refused one by one."""

from __future__ import annotations

import time

import grpc
import pytest
from prometheus_client import REGISTRY

from autoglm.billing.v1 import billing_service_pb2 as pb2
from autoglm.billing.v1 import billing_service_pb2_grpc as pb2_grpc
from services.billing.config import BillingConfig
from services.billing.server import build_server
from services.common.config import ServerSettings
from tests.integration.billing.helpers import OPERATOR_TOKEN, expected_cost, operator, price_request, ts, usage
from tests.waiting import wait_until

GRACE_S = 3.0


def record(request_id: str, completion: int = 7, replica: str = "inference-0", **kw: object) -> pb2.EngineUsageRecord:
    fields: dict[str, object] = {"tenant_id": "acme", "api_key_id": "k1", "model": "smollm2", "model_version": "v1",
                                 "prompt_tokens": 100, "completion_tokens": completion,
                                 "status": pb2.USAGE_STATUS_CANCELLED, "end_time": ts(time.time())}
    fields.update(kw)
    return pb2.EngineUsageRecord(request_id=request_id, replica_id=replica, **fields)  # type: ignore[arg-type]


async def by_source(stub: pb2_grpc.BillingServiceStub) -> dict[str, tuple[int, int]]:
    report = await stub.GetUsageReport(pb2.GetUsageReportRequest(
        start_time={"seconds": 0}, end_time={"seconds": int(time.time()) + 60},
        group_by=[pb2.REPORT_DIMENSION_SOURCE]))
    return {row.group["source"]: (row.requests, row.completion_tokens) for row in report.rows}


@pytest.fixture
async def billing(serve, database: str):
    return await serve(build_server(BillingConfig(server=ServerSettings(port=0), database=database,
                                                  operator_token=OPERATOR_TOKEN, engine_grace_s=GRACE_S,
                                                  engine_reconcile_s=0.05)))


async def test_records_reconcile_with_router_events_once_in_either_order(billing) -> None:
    async with operator(billing) as chan:
        stub = pb2_grpc.BillingServiceStub(chan)
        await stub.CreatePrice(price_request())
        # The router's event before the replica's record, and (for "after") within the grace.
        await stub.RecordUsage(pb2.RecordUsageRequest(event=usage("before", prompt=100, completion=5)))
        answer = await stub.ReportEngineUsage(pb2.ReportEngineUsageRequest(records=[
            record("before"), record("after"), record("orphan", 3, "inference-0"),
            record("orphan", 9, "inference-1"), record("orphan", 9, "inference-1"),
            record("", 1), record("future", end_time=ts(time.time() + 3600))]))
        await stub.RecordUsage(pb2.RecordUsageRequest(event=usage("after", prompt=100, completion=4)))
        sources = await wait_until(lambda: _engine_billed(stub), GRACE_S + 30, "the orphan record to be billed")
        late_before = _late_router()
        late = await stub.RecordUsage(pb2.RecordUsageRequest(event=usage("orphan", prompt=100, completion=2)))
        final = await by_source(stub)
    assert answer.accepted == 5
    assert [(r.index, r.error_code) for r in answer.rejections] == [(5, "INVALID_ARGUMENT"), (6, "INVALID_ARGUMENT")]
    assert "records[5].request_id is required" in answer.rejections[0].error_message
    assert "records[6].end_time" in answer.rejections[1].error_message
    # One event per request: the routers' counts where they reported, the longest record of the orphan.
    assert sources == final == {"router": (2, 5 + 4), "engine": (1, 9)}
    assert (late.duplicate, late.cost.micros) == (True, expected_cost(100, 9))
    assert _late_router() == late_before + 1  # counted in autoglm_billing_engine_records_total


def _late_router() -> float:
    return REGISTRY.get_sample_value("autoglm_billing_engine_records_total", {"outcome": "late_router"}) or 0.0


async def _engine_billed(stub: pb2_grpc.BillingServiceStub) -> dict[str, tuple[int, int]] | None:
    sources = await by_source(stub)
    return sources if "engine" in sources else None


async def test_a_batch_of_more_than_1000_records_is_refused_naming_the_limit(billing) -> None:
    async with operator(billing) as chan:
        stub = pb2_grpc.BillingServiceStub(chan)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.ReportEngineUsage(pb2.ReportEngineUsageRequest(records=[record(f"r{i}") for i in range(1001)]))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "at most 1000" in (refused.value.details() or "")
