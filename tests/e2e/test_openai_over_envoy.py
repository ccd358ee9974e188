"""`autoglm up --sidecar envoy`: the OpenAI-compatible HTTPS port is the router's Envoy (TLS with the mesh
CA, the bearer check) forwarding plain HTTP/1.1 to the router. The official `openai` SDK streams through
it, headers pass both ways, a call without credentials is refused by Envoy before it reaches the router,
and a client that hangs up mid-stream cancels the generation, billed as `cancelled`."""

from __future__ import annotations

import json
import ssl
import subprocess
import urllib.request
from collections.abc import Iterator

import httpx
import pytest

from tests.e2e.mesh_client import MODEL, create_key
from tests.e2e.mesh_process import Mesh, start_mesh, stop_mesh
from tests.e2e.test_openai_api import read_then_hang_up, sdk, settled

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    started: list[subprocess.Popen[bytes]] = []
    running = start_mesh(tmp_path_factory.mktemp("mesh"), started, extra_args=("--sidecar", "envoy"))
    try:
        yield running
    finally:
        if running.process.poll() is None:
            assert stop_mesh(running) == 0
        assert running.descendants() == []


def envoy_stat(mesh: Mesh, name: str) -> int:
    """One counter of the router's Envoy (its admin listener), 0 while it has not been touched."""
    prometheus = json.loads((mesh.data_dir / "endpoint.json").read_text())["metrics"]["router-sidecar"]
    admin = prometheus.removesuffix("/stats/prometheus")
    with urllib.request.urlopen(f"{admin}/stats?format=json&filter=^{name}$", timeout=5) as reply:
        stats = json.loads(reply.read())["stats"]
    return int(next((s["value"] for s in stats if s.get("name") == name), 0))


def test_the_official_sdk_streams_a_chat_completion_through_envoy(mesh: Mesh) -> None:
    assert mesh.openai_base_url.startswith("https://")
    forwarded_before = envoy_stat(mesh, "cluster.local_http.upstream_rq_total")
    client = sdk(mesh, (mesh.data_dir / "demo_api_key").read_text().strip())
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=[{"role": "user", "content": "Count from one to twenty."}], max_tokens=24,
        temperature=0, stream=True, stream_options={"include_usage": True},
        extra_headers={"x-request-id": "envoy-edge-check-1"}, extra_body={"cache_policy": "bypass"})
    assert raw.headers["x-request-id"] == "envoy-edge-check-1"  # the caller's id reached the router and back
    assert raw.headers["traceparent"].startswith("00-")
    assert raw.headers["content-type"].startswith("text/event-stream")
    chunks = list(raw.parse())
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text and chunks[-1].usage is not None and chunks[-1].usage.completion_tokens >= 1
    assert chunks[0].choices[0].delta.role == "assistant"
    assert envoy_stat(mesh, "cluster.local_http.upstream_rq_total") == forwarded_before + 1, \
        "the HTTPS port is Envoy's, and it forwarded the call to the router"


@pytest.mark.parametrize("authorization", [None, "Basic dXNlcjpwYXNz", "Bearer two words"])
def test_envoy_refuses_a_call_without_a_bearer_token_with_an_openai_error(mesh: Mesh, authorization: str | None
                                                                          ) -> None:
    forwarded_before = envoy_stat(mesh, "cluster.local_http.upstream_rq_total")
    headers = {"authorization": authorization} if authorization else {}
    with httpx.Client(verify=ssl.create_default_context(cafile=mesh.ca_cert), timeout=30) as http:
        refused = http.get(f"{mesh.openai_base_url}/models", headers=headers)
        assert refused.status_code == 401
        assert refused.headers["content-type"] == "application/json"
        assert refused.json()["error"]["code"] == "invalid_api_key"
        assert "authorization: Bearer <API key or JWT>" in refused.json()["error"]["message"]
        assert envoy_stat(mesh, "cluster.local_http.upstream_rq_total") == forwarded_before, \
            "refused at the edge, before the router spent anything on it"
        assert http.get(mesh.openai_base_url.removesuffix("/v1") + "/health").status_code == 200  # open


async def test_a_client_that_hangs_up_mid_stream_cancels_the_generation_and_is_billed_cancelled(mesh: Mesh
                                                                                                ) -> None:
    key = await create_key(mesh, "envoy-hangup")
    read_then_hang_up(sdk(mesh, key), max_tokens=400)
    totals = await settled(mesh, "envoy-hangup", 1)
    assert totals.by_status == {"cancelled": 1}, "the disconnect reached the router through Envoy"
    assert 5 <= totals.completion_tokens < 400
