"""Malformed and oversized requests from a fuzzer against the public API of the whole mesh, gRPC and the
OpenAI-compatible HTTP API: every answer is a status the caller can act on, with a message (never UNKNOWN
or INTERNAL, never a 500, never a stack trace), and no process dies. Over HTTP also huge bodies, bad
UTF-8, truncated bodies, a client sending its body slower than the read timeout and one that never
reads its stream."""

from __future__ import annotations

import asyncio
import json
import socket
import ssl
import subprocess
from collections.abc import Iterator

import grpc
import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from autoglm.common.v1 import generation_pb2
from autoglm.router.v1 import admin_service_pb2, router_service_pb2, router_service_pb2_grpc
from tests.e2e.mesh_client import create_key, router_channel
from tests.e2e.mesh_process import Mesh, start_mesh, stop_mesh

pytestmark = pytest.mark.slow
BODY_TIMEOUT_S = 3

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
    # A short body timeout, so the slow-client case is quick to see.
    running = start_mesh(tmp_path_factory.mktemp("fuzz"), started,
                         extra_config={"router": {"http_body_timeout_s": BODY_TIMEOUT_S}})
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


# --- the OpenAI-compatible HTTP API of the same mesh ---------------------------------------------------

JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
                    max_leaves=12)
FIELDS = st.sampled_from(["model", "messages", "prompt", "max_tokens", "max_completion_tokens", "temperature", "top_p",
                          "n", "stream", "stream_options", "stop", "seed", "user", "tags", "cache_policy", "tools",
                          "response_format", "logprobs", "presence_penalty", "context_id", "traffic_class", "top_k",
                          "repetition_penalty", "logit_bias"])
BASE = {"model": "smollm2-135m-instruct", "messages": [{"role": "user", "content": "hi"}], "prompt": "hi",
        "max_tokens": 2}
BODIES = st.one_of(JSON, st.dictionaries(FIELDS, JSON, max_size=6).map(lambda d: {**BASE, **d}))
PATHS = st.sampled_from(["/chat/completions", "/completions"])


def http_client(mesh: Mesh, key: str) -> httpx.Client:
    return httpx.Client(base_url=mesh.openai_base_url, timeout=60,
                        verify=ssl.create_default_context(cafile=mesh.ca_cert),
                        headers={"authorization": f"Bearer {key}"} if key else {})


def check_http(answer: httpx.Response) -> None:
    """200, or a 4xx with an OpenAI error body; never a 5xx, never a traceback."""
    assert answer.status_code == 200 or 400 <= answer.status_code < 500, (answer.status_code, answer.text[:500])
    assert "Traceback" not in answer.text and 'File "' not in answer.text
    if answer.status_code != 200:
        error = answer.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"], answer.text


@pytest.fixture(scope="module")
def http_key(mesh: Mesh) -> str:
    return asyncio.run(create_key(mesh, "http-fuzz"))


def tame(body: object, path: str) -> object:
    """A valid base for the endpoint with random fields over it, kept to short generations."""
    if isinstance(body, dict):
        body.pop("prompt" if path == "/chat/completions" else "messages", None)
        for name in ("max_tokens", "max_completion_tokens"):
            if isinstance(body.get(name), int) and body[name] > 4:
                body[name] = 4
    return body


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                 HealthCheck.too_slow])
@given(body=BODIES, path=PATHS, auth=st.sampled_from(["valid", "valid", "garbage", "none"]),
       raw=st.binary(max_size=128))
def test_fuzzed_http_calls_are_4xx_with_openai_errors_and_nothing_dies(mesh: Mesh, http_key: str, body, path,
                                                                       auth, raw) -> None:
    pids_before = sorted(mesh.descendants())
    key = http_key if auth == "valid" else "agk_garbage" if auth == "garbage" else ""
    with http_client(mesh, key) as client:
        content = json.dumps(tame(body, path)).encode()
        with client.stream("POST", path, content=content, headers={"content-type": "application/json"}) as answer:
            answer.read()
        check_http(answer)
        check_http(client.post(path, content=raw, headers={"content-type": "application/json"}))
    assert sorted(mesh.descendants()) == pids_before, "a process of the mesh died or restarted"


def test_huge_bodies_bad_utf8_and_wrong_types_are_4xx_with_openai_errors(mesh: Mesh, http_key: str) -> None:
    with http_client(mesh, http_key) as client:
        for path in ("/chat/completions", "/completions"):
            for content in (
                b'{"model": "smollm2-135m-instruct", "prompt": "' + b"x" * 5_000_000 + b'"}',  # over the body limit
                b'{"model": "smollm2-135m-instruct", "prompt": "\xff\xfe\xc3("}',  # not UTF-8
                b'{"model": "smollm2-135m-instruct", "messages": [{"role": "user", "content": "\xed\xa0\x80"}]}',
                b'{"model": 7, "messages": {"role": "user"}, "prompt": ["a", 1], "max_tokens": "many"}',
                b'{"model": "smollm2-135m-instruct", "prompt": "hi", "max_tokens": 1e400}',
                b'{"model": "smollm2-135m-instruct", "prompt": "hi", "n": true, "temperature": "hot"}',
                b"[" * 100_000 + b"]" * 100_000,  # nested deeper than any parser's recursion
                b'{"model": "smollm2-135m-instruct", "prompt": "hi"',  # cut short
            ):
                answer = client.post(path, content=content, headers={"content-type": "application/json"})
                check_http(answer)
                assert answer.status_code != 200, content[:80]
            # Chunked (no length declared) over the limit: cut off at the limit.
            answer = client.post(path, content=iter([b'{"prompt": "', b"x" * 5_000_000, b'"}']),
                                 headers={"content-type": "application/json"})
            assert answer.status_code == 413 and answer.json()["error"]["code"] == "request_too_large"
    assert_mesh_answers(mesh, http_key)


def raw_connection(mesh: Mesh) -> ssl.SSLSocket:
    host, port = mesh.openai_base_url.removeprefix("https://").split("/")[0].rsplit(":", 1)
    context = ssl.create_default_context(cafile=mesh.ca_cert)
    return context.wrap_socket(socket.create_connection((host, int(port)), timeout=60), server_hostname=host)


def head(key: str, length: int, path: str = "/v1/chat/completions") -> bytes:
    return (f"POST {path} HTTP/1.1\r\nhost: router\r\nauthorization: Bearer {key}\r\n"
            f"content-type: application/json\r\ncontent-length: {length}\r\n\r\n").encode()


def read_answer(sock: ssl.SSLSocket) -> tuple[int, bytes]:
    """Status and body of the one answer on `sock` (the server closes after it, or sends its length)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    status_line, _, rest = data.partition(b"\r\n")
    headers, _, body = rest.partition(b"\r\n\r\n")
    length = next((int(line.split(b":")[1]) for line in headers.split(b"\r\n")
                   if line.lower().startswith(b"content-length:")), None)
    while length is not None and len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return int(status_line.split()[1]), body


def assert_mesh_answers(mesh: Mesh, key: str) -> None:
    with http_client(mesh, key) as client:
        answer = client.post("/chat/completions",
                             json={"model": BASE["model"], "messages": BASE["messages"], "max_tokens": 2})
    assert answer.status_code == 200, answer.text


def test_truncated_bodies_and_clients_that_hang_up_leave_the_mesh_serving(mesh: Mesh, http_key: str) -> None:
    pids_before = sorted(mesh.descendants())
    body = json.dumps({"model": BASE["model"], "messages": BASE["messages"], "max_tokens": 2}).encode()
    for _ in range(5):
        # Content-Length larger than the body, then close.
        with raw_connection(mesh) as sock:
            sock.sendall(head(http_key, len(body) + 500) + body)
        # Half a head, then close.
        with raw_connection(mesh) as sock:
            sock.sendall(head(http_key, len(body))[:40])
    assert_mesh_answers(mesh, http_key)
    assert sorted(mesh.descendants()) == pids_before, "a process of the mesh died or restarted"


def test_a_client_sending_its_body_slower_than_the_read_timeout_gets_408(mesh: Mesh, http_key: str) -> None:
    body = json.dumps({"model": BASE["model"], "messages": BASE["messages"], "max_tokens": 2}).encode()
    with raw_connection(mesh) as sock:
        sock.sendall(head(http_key, len(body)) + body[:5])
        # Then nothing more: the router stops waiting after router.http_body_timeout_s and says why.
        status, answer = read_answer(sock)
    assert status == 408, answer
    error = json.loads(answer)["error"]
    assert error["code"] == "request_timeout" and f"within {BODY_TIMEOUT_S} seconds" in error["message"]
    assert_mesh_answers(mesh, http_key)


def test_a_client_that_never_reads_its_stream_does_not_stall_others(mesh: Mesh, http_key: str) -> None:
    body = json.dumps({"model": BASE["model"], "stream": True, "max_tokens": 64, "cache_policy": "bypass",
                       "messages": [{"role": "user", "content": "Write a long story."}]}).encode()
    with raw_connection(mesh) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.sendall(head(http_key, len(body)) + body)
        assert_mesh_answers(mesh, http_key)  # while that stream waits for its reader
    assert_mesh_answers(mesh, http_key)
