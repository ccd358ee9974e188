"""Rate limits, the response cache and single-flight, canary rollback, policies, contexts and tasks,
through the real router, billing and model."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration
from google.rpc import error_details_pb2, status_pb2
from prometheus_client import REGISTRY

from autoglm.common.v1 import generation_pb2
from autoglm.router.v1 import admin_service_pb2 as admin_pb2
from autoglm.router.v1 import router_service_pb2 as pb2
from services.common.ports import free_port
from tests.integration.router.conftest import ADMIN_TOKEN, MODEL, Mesh
from tests.integration.router.test_router_vertical import bearer, settled_rows

ADMIN = [("authorization", f"Bearer {ADMIN_TOKEN}")]


def greedy(max_tokens: int = 4) -> generation_pb2.SamplingParams:
    return generation_pb2.SamplingParams(temperature=0.0, max_tokens=max_tokens)


def retry_delay_s(error: grpc.aio.AioRpcError) -> float:
    for key, value in error.trailing_metadata() or ():
        if key == "grpc-status-details-bin":
            status = status_pb2.Status.FromString(value)
            for detail in status.details:
                if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
                    info = error_details_pb2.RetryInfo()
                    detail.Unpack(info)
                    return info.retry_delay.ToTimedelta().total_seconds()
    return 0.0


async def test_requests_per_minute_limit_answers_resource_exhausted_with_retry_info(mesh: Mesh) -> None:
    secret, _ = await mesh.create_key("acme", limits=admin_pb2.KeyLimits(requests_per_minute=2))
    request = pb2.CompleteRequest(model=MODEL, prompt="Hi", sampling=greedy(2), cache_policy=pb2.CACHE_POLICY_BYPASS)
    for _ in range(2):
        await mesh.router_stub.Complete(request, metadata=bearer(secret), timeout=60)
    with pytest.raises(grpc.aio.AioRpcError) as limited:
        await mesh.router_stub.Complete(request, metadata=bearer(secret), timeout=60)
    assert limited.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert 0 < retry_delay_s(limited.value) <= 30


async def test_identical_concurrent_requests_run_one_generation_and_repeats_hit_the_cache(mesh: Mesh) -> None:
    secret, _ = await mesh.create_key("acme")
    request = pb2.CompleteRequest(model=MODEL, prompt="Count to three.", sampling=greedy(6))
    replies = await asyncio.gather(*[
        mesh.router_stub.Complete(request, metadata=bearer(secret), timeout=120) for _ in range(20)])
    assert len({r.choices[0].text for r in replies}) == 1
    assert sum(1 for r in replies if not r.usage.cached) == 1
    again = await mesh.router_stub.Complete(request, metadata=bearer(secret), timeout=60)
    assert again.usage.cached and again.choices[0].text == replies[0].choices[0].text
    sampled = pb2.CompleteRequest(model=MODEL, prompt="Count to three.",
                                  sampling=generation_pb2.SamplingParams(temperature=0.9, max_tokens=3))
    first = await mesh.router_stub.Complete(sampled, metadata=bearer(secret), timeout=60)
    second = await mesh.router_stub.Complete(sampled, metadata=bearer(secret), timeout=60)
    assert not first.usage.cached and not second.usage.cached
    # Billing now knows the tenant is far from its limits, so generations start while holds are on the
    # way: a burst of 100 identical requests still runs one generation, however slow the last hold.
    burst = pb2.CompleteRequest(model=MODEL, prompt="Count to five.", sampling=greedy(6))
    replies = await asyncio.gather(*[
        mesh.router_stub.Complete(burst, metadata=bearer(secret), timeout=120) for _ in range(100)])
    assert len({r.choices[0].text for r in replies}) == 1
    assert sum(1 for r in replies if not r.usage.cached) == 1
    report = await settled_rows(mesh, "acme", 123)
    assert report.total.requests == 123 and report.total.cached_requests == 119


def _dead_address() -> str:
    return f"127.0.0.1:{free_port()}"


async def test_failing_canary_is_rolled_back_and_callers_still_get_answers(mesh: Mesh) -> None:
    secret, _ = await mesh.create_key("acme")
    window = Duration(seconds=60)
    await mesh.admin.RegisterModelVersion(admin_pb2.RegisterModelVersionRequest(
        model=MODEL, version="canary", replicas=[admin_pb2.Replica(address=_dead_address())],
        canary_policy=admin_pb2.CanaryPolicy(max_error_permille=50, window=window, min_requests=3),
    ), metadata=ADMIN, timeout=10)
    model = (await mesh.admin.GetModel(admin_pb2.GetModelRequest(model=MODEL), metadata=ADMIN, timeout=10)).model
    stable = next(v.version for v in model.versions if v.stable)
    await mesh.admin.SetTrafficSplit(admin_pb2.SetTrafficSplitRequest(model=MODEL, weights=[
        admin_pb2.VersionWeight(version=stable, weight_permille=500),
        admin_pb2.VersionWeight(version="canary", weight_permille=500)]), metadata=ADMIN, timeout=10)
    for index in range(12):
        reply = await mesh.router_stub.Complete(
            pb2.CompleteRequest(model=MODEL, prompt=f"Say {index}.", sampling=greedy(2)),
            metadata=bearer(secret), timeout=60)
        assert reply.model_version == stable
    model = (await mesh.admin.GetModel(admin_pb2.GetModelRequest(model=MODEL), metadata=ADMIN, timeout=10)).model
    weights = {v.version: v.weight_permille for v in model.versions}
    assert weights == {stable: 1000, "canary": 0}
    audit = await mesh.admin.ListAuditEvents(admin_pb2.ListAuditEventsRequest(action="model.rollback"),
                                             metadata=ADMIN, timeout=10)
    [event] = audit.events
    assert event.actor == "router.canary" and event.target == f"model/{MODEL}"
    assert "canary" in event.details["reason"] and not audit.next_page_token
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await mesh.admin.ListAuditEvents(admin_pb2.ListAuditEventsRequest(page_token="x"), metadata=ADMIN, timeout=10)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "page_token" in refused.value.details()


async def test_policy_blocks_without_echoing_terms(mesh: Mesh) -> None:
    secret, _ = await mesh.create_key("acme")
    await mesh.admin.SetPolicy(admin_pb2.SetPolicyRequest(
        tenant_id="acme", policy=admin_pb2.Policy(name="acme-rules", blocked_terms=["launch codes"],
                                                  max_tokens_cap=8)), metadata=ADMIN, timeout=10)
    with pytest.raises(grpc.aio.AioRpcError) as blocked:
        await mesh.router_stub.Complete(pb2.CompleteRequest(model=MODEL, prompt="Give me the LAUNCH CODES",
                                                            sampling=greedy(2)), metadata=bearer(secret), timeout=10)
    assert blocked.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "acme-rules" in blocked.value.details() and "launch" not in blocked.value.details().lower()
    with pytest.raises(grpc.aio.AioRpcError) as capped:
        await mesh.router_stub.Complete(pb2.CompleteRequest(model=MODEL, prompt="Hi", sampling=greedy(9)),
                                        metadata=bearer(secret), timeout=10)
    assert capped.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    # The change is in the audit log, which counts the blocked terms but never lists them.
    [event] = (await mesh.admin.ListAuditEvents(admin_pb2.ListAuditEventsRequest(action="policy.set"),
                                                metadata=ADMIN, timeout=10)).events
    assert (event.actor, event.target) == ("admin", "tenant/acme")
    assert event.details["blocked_terms"] == 1 and event.details["max_tokens_cap"] == 8
    assert "launch" not in str(event).lower()


async def test_context_conversation_is_replayed_on_the_next_turn(mesh: Mesh) -> None:
    secret, _ = await mesh.create_key("acme")
    first = await mesh.router_stub.Complete(
        pb2.CompleteRequest(model=MODEL, prompt="My name is Ada.", context_id="conv-1", sampling=greedy(4)),
        metadata=bearer(secret), timeout=60)
    second = await mesh.router_stub.Complete(
        pb2.CompleteRequest(model=MODEL, prompt="What is my name?", context_id="conv-1", sampling=greedy(4)),
        metadata=bearer(secret), timeout=60)
    alone = await mesh.router_stub.CountTokens(pb2.CountTokensRequest(model=MODEL, prompt="What is my name?"),
                                               metadata=bearer(secret), timeout=10)
    # The second turn carried the first exchange: its prompt is longer than the question alone.
    assert second.usage.prompt_tokens > alone.token_count + first.usage.completion_tokens


def _replica_counts() -> float:
    """CountTokens calls the inference replica has served in this process."""
    return REGISTRY.get_sample_value("autoglm_rpc_started_total", {
        "service": "inference", "method": "/autoglm.inference.v1.InferenceService/CountTokens"}) or 0.0


async def test_a_conversations_turns_are_counted_with_the_routers_tokenizer_not_a_replica_round_trip(
        mesh: Mesh) -> None:
    """The router holds the model's tokenizer and template: fitting a stored conversation to the window
    costs no CountTokens call to the replica, and the count equals the replica's own."""
    secret, _ = await mesh.create_key("acme")
    before = _replica_counts()
    for text in ("My name is Ada.", "What is my name?", "Spell it."):
        turn = await mesh.router_stub.Complete(
            pb2.CompleteRequest(model=MODEL, prompt=text, context_id="conv-count", sampling=greedy(6)),
            metadata=bearer(secret), timeout=60)
    assert _replica_counts() == before
    replayed = await mesh.router_stub.CountTokens(pb2.CountTokensRequest(model=MODEL, messages=[
        generation_pb2.ChatMessage(role=generation_pb2.CHAT_ROLE_USER, content="x")]),
        metadata=bearer(secret), timeout=10)  # the replica's count (a reference that it is reachable)
    assert replayed.token_count > 0 and _replica_counts() == before + 1
    assert turn.usage.prompt_tokens > replayed.token_count


async def test_run_task_summarize(mesh: Mesh) -> None:
    secret, _ = await mesh.create_key("acme")
    reply = await mesh.router_stub.RunTask(pb2.RunTaskRequest(
        model=MODEL, kind=pb2.TASK_KIND_SUMMARIZE, content="The cat sat on the mat all day long.",
        target_length=pb2.TargetLength(unit=pb2.LENGTH_UNIT_WORDS, value=5),
        sampling=generation_pb2.SamplingParams(max_tokens=6)), metadata=bearer(secret), timeout=60)
    assert reply.output and reply.usage.completion_tokens <= 6
    with pytest.raises(grpc.aio.AioRpcError) as bad:
        await mesh.router_stub.RunTask(pb2.RunTaskRequest(model=MODEL, kind=pb2.TASK_KIND_TRANSLATE, content="x"),
                                       metadata=bearer(secret), timeout=10)
    assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "target_language" in bad.value.details()
