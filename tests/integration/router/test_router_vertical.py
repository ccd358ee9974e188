"""A key created through AdminService streams tokens from the real model through the router; usage and
cost arrive in the last message and in billing, exactly once per request."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from autoglm.billing.v1 import billing_service_pb2 as billing_pb2
from autoglm.common.v1 import generation_pb2
from autoglm.inference.v1 import inference_service_pb2 as inf_pb2
from autoglm.inference.v1 import inference_service_pb2_grpc as inf_grpc
from autoglm.router.v1 import admin_service_pb2 as admin_pb2
from autoglm.router.v1 import router_service_pb2 as pb2
from tests.integration.router.conftest import ADMIN_TOKEN, MODEL, Mesh
from tests.settlement import settled_usage
from tests.waiting import wait_until

GREEDY = generation_pb2.SamplingParams(temperature=0.0, max_tokens=6)


def bearer(secret: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {secret}")]


async def settled_rows(mesh: Mesh, tenant: str, expected: int = 1) -> billing_pb2.GetUsageReportResponse:
    """The usage report once settlement is idle: billing holds at least `expected` requests, the router's
    spool and journal are empty and nothing changed for a settle window (so a late duplicate is seen)."""
    return await settled_usage(lambda: usage_rows(mesh, tenant), lambda r: r.total.requests, expected,
                               f"{expected} usage events for {tenant}", routers=[mesh.data_dir])


async def usage_rows(mesh: Mesh, tenant: str) -> billing_pb2.GetUsageReportResponse:
    start, end = Timestamp(), Timestamp()
    start.FromDatetime(datetime.now(UTC) - timedelta(hours=1))
    end.FromDatetime(datetime.now(UTC) + timedelta(hours=1))
    return await mesh.billing_stub.GetUsageReport(
        billing_pb2.GetUsageReportRequest(start_time=start, end_time=end, tenant_id=tenant,
                                          group_by=[billing_pb2.REPORT_DIMENSION_STATUS]), timeout=10,
        wait_for_ready=True)


async def test_generate_streams_tokens_and_bills_usage_once(mesh: Mesh) -> None:
    secret, key = await mesh.create_key("acme")
    assert secret.startswith(key.prefix) and key.prefix.startswith("ag_")
    request = pb2.GenerateRequest(model=MODEL, prompt="Name a colour.", sampling=GREEDY, tags={"team": "search"})
    replies = [r async for r in mesh.router_stub.Generate(
        request, metadata=[*bearer(secret), ("x-request-id", "req-vertical-1")], timeout=60)]
    deltas = [r for r in replies if not r.HasField("summary")]
    summary = replies[-1].summary
    assert deltas and "".join(d.delta for d in deltas)
    assert all(r.id == "req-vertical-1" for r in replies)
    assert summary.usage.completion_tokens == sum(d.delta_tokens for d in deltas) > 0
    assert summary.usage.prompt_tokens > 0
    expected = summary.usage.prompt_tokens * 1 + summary.usage.completion_tokens * 2
    assert summary.cost.micros == expected and summary.cost.currency_code == "USD"
    assert summary.model == MODEL and summary.model_version and len(summary.trace_id) == 32
    report = await settled_rows(mesh, "acme")
    assert report.total.requests == 1
    assert report.total.completion_tokens == summary.usage.completion_tokens
    assert report.total.cost.micros == expected


async def test_complete_count_tokens_and_list_models(mesh: Mesh) -> None:
    secret, _ = await mesh.create_key("acme", allowed_models=[MODEL])
    reply = await mesh.router_stub.Complete(
        pb2.CompleteRequest(model=MODEL, messages=[generation_pb2.ChatMessage(role=generation_pb2.CHAT_ROLE_USER,
                                                                              content="Say hi.")], sampling=GREEDY),
        metadata=bearer(secret), timeout=60)
    assert reply.choices[0].text and reply.usage.completion_tokens <= 6
    counted = await mesh.router_stub.CountTokens(pb2.CountTokensRequest(model=MODEL, prompt="Say hi."),
                                                 metadata=bearer(secret), timeout=10)
    assert counted.token_count == reply.usage.prompt_tokens
    assert counted.context_window > 0
    models = await mesh.router_stub.ListModels(pb2.ListModelsRequest(), metadata=bearer(secret), timeout=10)
    assert [m.name for m in models.models] == [MODEL]
    assert models.models[0].versions[0].weight_permille == 1000


async def test_credentials_are_checked(mesh: Mesh) -> None:
    secret, key = await mesh.create_key("acme", allowed_models=["some-other-model"])
    request = pb2.CompleteRequest(model=MODEL, prompt="hi", sampling=GREEDY)
    with pytest.raises(grpc.aio.AioRpcError) as missing:
        await mesh.router_stub.Complete(request, timeout=10)
    assert missing.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.aio.AioRpcError) as unknown:
        await mesh.router_stub.Complete(request, metadata=bearer("ag_nope1234_x"), timeout=10)
    assert unknown.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.aio.AioRpcError) as denied:
        await mesh.router_stub.Complete(request, metadata=bearer(secret), timeout=10)
    assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
    admin = [("authorization", f"Bearer {ADMIN_TOKEN}")]
    await mesh.admin.RevokeApiKey(admin_pb2.RevokeApiKeyRequest(key_id=key.key_id), metadata=admin, timeout=10)
    with pytest.raises(grpc.aio.AioRpcError) as revoked:
        await mesh.router_stub.Complete(request, metadata=bearer(secret), timeout=10)
    assert revoked.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "revoked" in revoked.value.details()
    with pytest.raises(grpc.aio.AioRpcError) as not_admin:
        await mesh.admin.ListApiKeys(admin_pb2.ListApiKeysRequest(), metadata=bearer(secret), timeout=10)
    assert not_admin.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_cancelled_stream_stops_the_sequence_and_is_billed_once_with_the_tokens_received(mesh: Mesh) -> None:
    secret, _ = await mesh.create_key("acme")
    inference = inf_grpc.InferenceServiceStub(grpc.aio.insecure_channel(mesh.inference.address))
    loads = inference.WatchLoad(inf_pb2.WatchLoadRequest(interval_ms=50), timeout=60)
    before = await loads.read()
    call = mesh.router_stub.Generate(
        pb2.GenerateRequest(model=MODEL, prompt="Write a long story about a dragon.",
                            sampling=generation_pb2.SamplingParams(temperature=0.0, max_tokens=200)),
        metadata=bearer(secret), timeout=60)
    received = 0
    async for reply in call:
        received += reply.delta_tokens
        if received >= 5:
            break
    call.cancel()
    # The replica drops the sequence: its cancelled counter rises and no sequence stays active.
    async def dropped() -> inf_pb2.WatchLoadResponse | None:
        load = await loads.read()
        return load if load.cancelled_total > before.cancelled_total and load.active_sequences == 0 else None

    load = await wait_until(dropped, 30, "the replica to drop the cancelled sequence", interval=0)
    loads.cancel()
    assert load.cancelled_total == before.cancelled_total + 1 and load.active_sequences == 0
    report = await settled_rows(mesh, "acme")
    assert report.total.requests == 1
    [row] = report.rows
    assert row.group["status"].lower() == "cancelled"
    # Billed for what was generated: the tokens received plus at most the few in flight when it stopped.
    assert received <= row.completion_tokens <= received + 4
