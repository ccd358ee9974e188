"""Malformed and oversized requests from a fuzzer against the public API of the whole mesh: every answer
is a status the caller can act on, with a message (never UNKNOWN or INTERNAL, never a stack trace), and no
process dies."""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import Iterator

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from autoglm.common.v1 import generation_pb2
from autoglm.router.v1 import admin_service_pb2, router_service_pb2, router_service_pb2_grpc
from tests.e2e.mesh_client import create_key, router_channel
from tests.e2e.mesh_process import Mesh, start_mesh, stop_mesh

pytestmark = pytest.mark.slow

# Statuses a caller can act on. Bytes that are not a protobuf message at all are INVALID_ARGUMENT too.
ACTIONABLE = {
    grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.NOT_FOUND, grpc.StatusCode.OUT_OF_RANGE, grpc.StatusCode.UNIMPLEMENTED,
}

text = st.one_of(st.text(max_size=40), st.text(min_size=2000, max_size=4000), st.just(""),
                 st.just("\x00\ud7ff\ufffd"), st.sampled_from(["smollm2-135m-instruct", "no-such-model", "a@b@c"]),
                 # over the router's max_prompt_bytes (1 MiB), and far too long for any echoed identifier
                 st.sampled_from(["x" * 1_100_000, "\u00e9" * 600_000]))
ints = st.one_of(st.integers(-(2**31), 2**31 - 1), st.integers(-3, 8))
floats = st.one_of(st.floats(allow_nan=True, allow_infinity=True, width=32), st.floats(-1, 3, width=32))


@st.composite
def sampling(draw: st.DrawFn) -> generation_pb2.SamplingParams:
    params = generation_pb2.SamplingParams(stop=draw(st.lists(st.text(max_size=80), max_size=10)))
    for name, strategy in (("temperature", floats), ("top_p", floats), ("top_k", ints),
                           ("repetition_penalty", floats), ("max_tokens", ints)):
        if draw(st.booleans()):
            setattr(params, name, draw(strategy))
    if draw(st.booleans()):
        params.seed = draw(st.integers(0, 2**64 - 1))
    return params


@st.composite
def generate_requests(draw: st.DrawFn) -> router_service_pb2.GenerateRequest:
    request = router_service_pb2.GenerateRequest(
        model=draw(text), prompt=draw(text), sampling=draw(sampling()), context_id=draw(text),
        tags=draw(st.dictionaries(st.text(max_size=80), st.text(max_size=80), max_size=20)),
        traffic_class=draw(st.integers(0, 5)), cache_policy=draw(st.integers(0, 4)), raw_prompt=draw(st.booleans()),
    )
    for _ in range(draw(st.integers(0, 3))):
        request.messages.add(role=draw(st.integers(0, 6)), content=draw(text))
    return request


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    started: list[subprocess.Popen[bytes]] = []
    running = start_mesh(tmp_path_factory.mktemp("fuzz"), started)
    try:
        yield running
    finally:
        if running.process.poll() is None:
            stop_mesh(running)


def check(error: grpc.aio.AioRpcError | None) -> None:
    if error is None:
        return
    code = error.code()
    details = error.details() or ""
    assert "Traceback" not in details and 'File "' not in details, details
    assert code in ACTIONABLE, (code, details)
    assert details, f"{code.name} without a message"


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                 HealthCheck.too_slow])
@given(request=generate_requests(), auth=st.sampled_from(["valid", "garbage", "none"]),
       raw=st.binary(max_size=256))
def test_fuzzed_public_calls_get_proper_statuses_and_nothing_dies(mesh: Mesh, request, auth, raw) -> None:
    pids_before = sorted(mesh.descendants())

    async def run() -> None:
        key = await create_key(mesh, "fuzz") if auth == "valid" else "ag_garbage" if auth == "garbage" else ""
        metadata = (("authorization", f"Bearer {key}"),) if key else ()
        async with router_channel(mesh) as channel:
            stub = router_service_pb2_grpc.RouterServiceStub(channel)
            # Keep real generations short: the fuzzer is after validation, not throughput.
            if request.sampling.HasField("max_tokens") and 0 < request.sampling.max_tokens > 8:
                request.sampling.max_tokens = 8
            error = None
            try:
                async for _ in stub.Generate(request, metadata=metadata, timeout=60):
                    pass
            except grpc.aio.AioRpcError as exc:
                error = exc
            check(error)
            for method in ("Complete", "CountTokens", "RunTask"):
                call = channel.unary_unary(f"/autoglm.router.v1.RouterService/{method}")
                try:
                    await call(raw, metadata=metadata, timeout=60)
                    error = None
                except grpc.aio.AioRpcError as exc:
                    error = exc
                check(error)
            garbled = channel.unary_stream("/autoglm.router.v1.RouterService/Generate")
            try:
                async for _ in garbled(raw, metadata=metadata, timeout=60):
                    pass
                error = None
            except grpc.aio.AioRpcError as exc:
                error = exc
            check(error)
            admin = channel.unary_unary("/autoglm.router.v1.AdminService/CreateApiKey")
            try:
                await admin(admin_service_pb2.CreateApiKeyRequest(tenant_id=request.model).SerializeToString(),
                            metadata=metadata, timeout=30)
                error = None
            except grpc.aio.AioRpcError as exc:
                error = exc
            check(error)
            if error is not None:
                assert error.code() in {grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED}

    asyncio.run(run())
    assert sorted(mesh.descendants()) == pids_before, "a process of the mesh died or restarted"
