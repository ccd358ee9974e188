"""Oversized input is refused first: INVALID_ARGUMENT naming the limit and the field, before the
router authenticates, checks policy, replays a context or asks a replica to tokenize."""

from __future__ import annotations

import random
import string
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2

from autoglm.common.v1 import generation_pb2
from autoglm.router.v1 import admin_service_pb2 as admin_pb2
from autoglm.router.v1 import router_service_pb2 as pb2
from services.inference.engine.model import LoadedModel
from tests.integration.router.conftest import ADMIN_TOKEN, MODEL, Mesh, start_mesh
from tests.integration.router.test_router_vertical import bearer

BIG = "lorem ipsum " * 610_000  # 7.3 MB


def bad_field(error: grpc.aio.AioRpcError) -> str:
    for key, value in error.trailing_metadata() or ():
        if key == "grpc-status-details-bin":
            for detail in status_pb2.Status.FromString(value).details:
                if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                    bad = error_details_pb2.BadRequest()
                    detail.Unpack(bad)
                    return bad.field_violations[0].field
    return ""


async def refused(call: object, request: object, metadata: list[tuple[str, str]] | None = None,
                  timeout: float = 30) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        result = call(request, metadata=metadata or [], timeout=timeout)  # type: ignore[operator]
        if hasattr(result, "__aiter__"):
            async for _ in result:
                pass
        else:
            await result
    return caught.value


async def test_a_huge_prompt_is_refused_with_the_limit_before_authentication(mesh: Mesh) -> None:
    stub = mesh.router_stub
    # No credentials at all: the size is what is wrong, and it is what the caller hears.
    for call, request in [
        (stub.Complete, pb2.CompleteRequest(model=MODEL, prompt=BIG)),
        (stub.Generate, pb2.GenerateRequest(model=MODEL, prompt=BIG)),
        (stub.CountTokens, pb2.CountTokensRequest(model=MODEL, prompt=BIG)),
        (stub.RunTask, pb2.RunTaskRequest(model=MODEL, kind=pb2.TASK_KIND_SUMMARIZE, content=BIG)),
    ]:
        error = await refused(call, request)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (error.code(), error.details())
        details = error.details() or ""
        assert "7,320,000 bytes" in details and "1,048,576" in details and "max_prompt_bytes" in details, details
        assert bad_field(error) in {"prompt", "content"}

    # The prompt's bytes add up over messages; the field named is the largest one.
    chat = pb2.CompleteRequest(model=MODEL)
    for size in (300_000, 500_000, 300_000):
        chat.messages.add(role=generation_pb2.CHAT_ROLE_USER, content="é" * (size // 2))  # 2 bytes each in UTF-8
    error = await refused(stub.Complete, chat)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "1,100,000 bytes" in (error.details() or "")
    assert bad_field(error) == "messages[1].content"

    # Each item of a batch is one prompt.
    batch = pb2.SubmitBatchRequest(model=MODEL)
    batch.items.add(prompt="hi")
    batch.items.add(prompt="x" * 1_100_000)
    error = await refused(stub.SubmitBatch, batch)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and bad_field(error) == "items[1].prompt"


async def test_a_request_bloated_by_tags_or_stop_sequences_is_refused_with_the_request_limit(mesh: Mesh) -> None:
    secret, _ = await mesh.create_key("acme")
    for request in [
        pb2.CompleteRequest(model=MODEL, prompt="hi", tags={f"k{i}": "v" * 60_000 for i in range(40)}),
        pb2.CompleteRequest(model=MODEL, prompt="hi",
                            sampling=generation_pb2.SamplingParams(stop=["s" * 100_000] * 25)),
    ]:
        error = await refused(mesh.router_stub.Complete, request, bearer(secret))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (error.code(), error.details())
        assert "max_request_bytes" in (error.details() or "") and "2,097,152" in (error.details() or "")
        assert bad_field(error) == "request"


async def test_limits_above_the_default_receive_size_are_answered_by_the_router_not_grpc(
        serve, tmp_path: Path, loaded_model: LoadedModel) -> None:
    mesh = await start_mesh(serve, tmp_path, loaded_model, max_prompt_bytes=4 * 1024 * 1024,
                            max_request_bytes=12 * 1024 * 1024)
    try:
        request = pb2.CompleteRequest(model=MODEL, prompt="x" * 10_000_000)  # over gRPC's default 8 MiB
        error = await refused(mesh.router_stub.Complete, request)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (error.code(), error.details())
        assert "4,194,304" in (error.details() or "")
    finally:
        await mesh.channel.close()
        await mesh.billing_channel.close()


async def test_huge_identifiers_get_their_own_status_not_a_dropped_stream(mesh: Mesh) -> None:
    """A field echoed in an error message (a model name, a job id) must not push the status past gRPC's
    trailer limit, which would turn it into RESOURCE_EXHAUSTED "Stream removed"."""
    secret, _ = await mesh.create_key("acme")
    stub = mesh.router_stub
    for call, request in [
        (stub.Complete, pb2.CompleteRequest(model="m" * 100_000, prompt="hi")),
        (stub.CountTokens, pb2.CountTokensRequest(model="m" * 100_000, prompt="hi")),
        (stub.SubmitBatch, pb2.SubmitBatchRequest(model="m" * 100_000, items=[pb2.BatchItem(prompt="hi")])),
    ]:
        error = await refused(call, request, bearer(secret))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (error.code(), error.details())
        assert "at most 256 characters" in (error.details() or "") and bad_field(error) == "model"
    error = await refused(stub.GetJob, pb2.GetJobRequest(job_id="j" * 100_000), bearer(secret))
    assert error.code() == grpc.StatusCode.NOT_FOUND, (error.code(), error.details())


async def test_ten_thousand_blocked_terms_refuse_a_large_prompt_promptly(mesh: Mesh) -> None:
    rng = random.Random(7)
    terms = ["".join(rng.choices(string.ascii_lowercase, k=rng.randint(6, 14))) for _ in range(9_999)]
    terms.append("forbidden-term")
    await mesh.admin.SetPolicy(admin_pb2.SetPolicyRequest(policy=admin_pb2.Policy(name="house", blocked_terms=terms)),
                               metadata=[("authorization", f"Bearer {ADMIN_TOKEN}")], timeout=30)
    secret, _ = await mesh.create_key("acme")
    prompt = "The quick brown fox jumps over the lazy dog. " * 21_000 + "FORBIDDEN-TERM"  # ~945 KB, term last
    # A loop over the terms takes ~20 s on this text (past the 10 s deadline); one automaton pass ~50 ms.
    error = await refused(mesh.router_stub.Complete, pb2.CompleteRequest(model=MODEL, prompt=prompt), bearer(secret),
                          timeout=10)
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED, (error.code(), error.details())
    assert "house" in (error.details() or "") and "forbidden" not in (error.details() or "").lower()
    assert "fox" not in (error.details() or "")
