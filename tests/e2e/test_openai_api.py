"""The OpenAI-compatible HTTP API as its users meet it: the official `openai` package (sync and async)
against the whole mesh that `autoglm up` starts (HTTPS with the mesh CA, the real model), with curl-like
raw requests where the wire itself is the point, the same request over gRPC for parity, the gRPC
path's cache, limit, budget and canary scenarios over HTTP, billing's ledger for the usage events, and
the replica's /metrics for when a hung-up stream's sequence ends."""

from __future__ import annotations

import json
import os
import ssl
import subprocess
import sys
from collections.abc import Iterator

import httpx
import openai
import pytest
import yaml

from autoglm.billing.v1 import billing_service_pb2, billing_service_pb2_grpc
from autoglm.common.v1 import generation_pb2, money_pb2
from autoglm.router.v1 import admin_service_pb2, admin_service_pb2_grpc, router_service_pb2, router_service_pb2_grpc
from services.cli.endpoint import billing_token, load_endpoint, operator_channel
from services.common.ports import free_ports
from tests.conftest import ROOT
from tests.e2e.mesh_client import MODEL, Totals, create_key, router_channel, usage_totals
from tests.e2e.mesh_process import Mesh, start_mesh, stop_mesh
from tests.settlement import settled_usage
from tests.waiting import wait_until

QUESTION = "What is the capital of France? Answer in one word."


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    started: list[subprocess.Popen[bytes]] = []
    # The replica's /metrics on, to see when it ends a sequence and how many tokens it generated.
    running = start_mesh(tmp_path_factory.mktemp("mesh"), started,
                         extra_config={"inference": {"metrics_port": free_ports(1)[0]}})
    try:
        yield running
    finally:
        if running.process.poll() is None:
            assert stop_mesh(running) == 0, "the mesh (router with its HTTP server) stops cleanly"
        assert running.descendants() == []


def demo_key(mesh: Mesh) -> str:
    return (mesh.data_dir / "demo_api_key").read_text().strip()


def sdk(mesh: Mesh, key: str, requests: list[httpx.Request] | None = None, retries: int = 0) -> openai.OpenAI:
    hooks = {"request": [requests.append]} if requests is not None else {}
    return openai.OpenAI(base_url=mesh.openai_base_url, api_key=key, max_retries=retries,
                         http_client=httpx.Client(verify=ssl.create_default_context(cafile=mesh.ca_cert),
                                                     event_hooks=hooks, timeout=120))


def async_sdk(mesh: Mesh, key: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=mesh.openai_base_url, api_key=key, max_retries=0,
                              http_client=httpx.AsyncClient(verify=ssl.create_default_context(cafile=mesh.ca_cert),
                                                               timeout=120))


def read_then_hang_up(client: openai.OpenAI, max_tokens: int, chunks: int = 5) -> None:
    """A client that streams a long answer, reads `chunks` chunks with text and closes the connection."""
    with client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Tell a long story."}],
                                        max_tokens=max_tokens, temperature=0, stream=True,
                                        extra_body={"cache_policy": "bypass"}) as stream:
        received = 0
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                received += 1
            if received == chunks:
                break


async def settled(mesh: Mesh, tenant: str, expected: int, timeout_s: float = 60) -> Totals:
    """Billing's totals once settlement is idle (so a late duplicate would be seen, not missed)."""
    return await settled_usage(lambda: usage_totals(mesh, tenant), lambda t: t.requests, expected,
                               f"{expected} usage events for {tenant}", routers=[mesh.data_dir / "router"],
                               timeout_s=timeout_s, interval_s=0.25)


def test_the_banner_prints_the_base_url_curl_and_openai_variables(mesh: Mesh) -> None:
    banner = "".join(mesh.output)
    assert mesh.openai_base_url.startswith("https://127.0.0.1:")
    assert f"OPENAI_BASE_URL={mesh.openai_base_url}" in banner
    assert f"curl -N --cacert {mesh.data_dir / 'certs' / 'ca.pem'} {mesh.openai_base_url}/chat/completions" in banner


def test_chat_completion_with_the_official_client(mesh: Mesh) -> None:
    raw = sdk(mesh, demo_key(mesh)).chat.completions.with_raw_response.create(
        model=MODEL, messages=[{"role": "user", "content": QUESTION}], max_tokens=12, temperature=0)
    answer = raw.parse()
    assert answer.object == "chat.completion" and answer.id == f"chatcmpl-{raw.headers['x-request-id']}"
    assert raw.headers["traceparent"].startswith("00-")
    assert answer.choices[0].message.role == "assistant" and answer.choices[0].message.content
    assert answer.choices[0].finish_reason in {"stop", "length"}
    usage = answer.usage
    assert usage is not None and usage.prompt_tokens > 0 and 0 < usage.completion_tokens <= 12
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert (usage.model_extra or {})["cost"]["currency"] == "USD" and usage.model_extra["cost"]["micros"] > 0
    assert answer.model == MODEL and (answer.model_extra or {})["model_version"]


def test_streamed_chat_with_usage(mesh: Mesh) -> None:
    chunks = list(sdk(mesh, demo_key(mesh)).chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Count from one to ten."}], max_tokens=24,
        temperature=0, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    content = [c for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(content) >= 3, "the answer arrives as several chunks"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert all(f is None for f in finishes[:-1]) and finishes[-1] in {"stop", "length"}
    last = chunks[-1]
    assert last.choices == [] and last.usage is not None
    assert last.usage.completion_tokens >= len(content) and last.usage.prompt_tokens > 0


def test_completions_streamed_and_not(mesh: Mesh) -> None:
    client = sdk(mesh, demo_key(mesh))
    answer = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=8, temperature=0)
    assert answer.object == "text_completion" and answer.choices[0].text
    streamed = list(client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=8,
                                              temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in streamed if c.choices) == answer.choices[0].text


def test_models_list_and_retrieve(mesh: Mesh) -> None:
    client = sdk(mesh, demo_key(mesh))
    models = client.models.list()
    assert MODEL in [m.id for m in models.data]
    card = client.models.retrieve(MODEL)
    assert card.id == MODEL and (card.model_extra or {})["versions"][0]["healthy_replicas"] >= 1
    # The default sampling `autoglm up` seeds for the bundled model (what unset fields get).
    assert card.model_extra["versions"][0]["default_sampling"] == {
        "temperature": 0.2, "top_p": 0.9, "top_k": None, "repetition_penalty": 1.1}
    with pytest.raises(openai.NotFoundError) as missing:
        client.models.retrieve("no-such-model")
    assert missing.value.code == "model_not_found"


def test_n_2_answers_two_choices(mesh: Mesh) -> None:
    answer = sdk(mesh, demo_key(mesh)).chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Say a colour."}], max_tokens=6, n=2, seed=7,
        temperature=0.8)
    assert [c.index for c in answer.choices] == [0, 1] and all(c.message.content for c in answer.choices)


def test_a_bad_key_raises_authentication_error(mesh: Mesh) -> None:
    with pytest.raises(openai.AuthenticationError) as caught:
        sdk(mesh, "agk_not_a_real_key_at_all").chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}])
    assert caught.value.status_code == 401 and caught.value.code == "invalid_api_key"


def test_a_field_the_mesh_cannot_honour_is_a_bad_request_naming_it(mesh: Mesh) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        sdk(mesh, demo_key(mesh)).chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}],
            tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}])
    assert caught.value.param == "tools" and caught.value.code == "unsupported_parameter"  # type: ignore[attr-defined]


def test_a_prompt_plus_max_tokens_over_the_window_is_context_length_exceeded_with_both_numbers(mesh: Mesh) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        sdk(mesh, demo_key(mesh)).chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": QUESTION}], max_tokens=8190)
    error = caught.value
    assert error.code == "context_length_exceeded" and error.param == "max_tokens"  # type: ignore[attr-defined]
    assert "max_tokens (8190)" in error.message and "(8192 tokens)" in error.message, error.message


async def test_async_client_streams_too(mesh: Mesh) -> None:
    async with async_sdk(mesh, demo_key(mesh)) as client:
        stream = await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": QUESTION}], max_tokens=8, stream=True)
        text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    assert text


async def test_the_same_greedy_request_by_grpc_and_http_answers_alike_and_bills_once_each(mesh: Mesh) -> None:
    key = await create_key(mesh, "parity")
    request = router_service_pb2.CompleteRequest(
        model=MODEL, messages=[generation_pb2.ChatMessage(role=generation_pb2.CHAT_ROLE_USER, content=QUESTION)],
        sampling=generation_pb2.SamplingParams(temperature=0.0, max_tokens=16),
        cache_policy=router_service_pb2.CACHE_POLICY_BYPASS)
    async with router_channel(mesh) as channel:
        by_grpc = await router_service_pb2_grpc.RouterServiceStub(channel).Complete(
            request, metadata=(("authorization", f"Bearer {key}"),), timeout=120)
    async with async_sdk(mesh, key) as client:
        by_http = await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": QUESTION}], max_tokens=16, temperature=0,
            extra_body={"cache_policy": "bypass"})
    assert by_http.choices[0].message.content == by_grpc.choices[0].text
    assert by_http.usage is not None
    assert (by_http.usage.prompt_tokens, by_http.usage.completion_tokens) == (
        by_grpc.usage.prompt_tokens, by_grpc.usage.completion_tokens)
    assert (by_http.usage.model_extra or {})["cost"]["micros"] == by_grpc.cost.micros
    totals = await settled(mesh, "parity", 2)
    assert totals.requests == 2 and totals.by_status == {"completed": 2}
    assert totals.completion_tokens == 2 * by_grpc.usage.completion_tokens


async def test_every_http_answer_is_one_usage_event_and_a_dropped_stream_is_billed_as_cancelled(mesh: Mesh) -> None:
    key = await create_key(mesh, "http-ledger")
    client = sdk(mesh, key)
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=4,
                                          extra_body={"cache_policy": "bypass"})
    text = client.completions.create(model=MODEL, prompt="Hello", max_tokens=4, extra_body={"cache_policy": "bypass"})
    two = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=4,
                                         n=2, extra_body={"cache_policy": "bypass"})
    expected_tokens = sum(a.usage.completion_tokens for a in (chat, text, two) if a.usage)
    read_then_hang_up(client, max_tokens=200)
    totals = await settled(mesh, "http-ledger", 5)
    assert totals.requests == 5, "one event per generation: chat, completion, two choices, the dropped stream"
    assert totals.by_status == {"completed": 4, "cancelled": 1}
    assert expected_tokens + 5 <= totals.completion_tokens < expected_tokens + 200


async def test_a_spent_budget_is_insufficient_quota_and_the_sdk_does_not_retry_it(mesh: Mesh) -> None:
    billing = load_endpoint(mesh.data_dir).billing
    async with operator_channel(billing, billing_token(mesh.data_dir)) as channel:
        await billing_service_pb2_grpc.BillingServiceStub(channel).CreateBudget(
            billing_service_pb2.CreateBudgetRequest(budget=billing_service_pb2.Budget(
                scope=billing_service_pb2.BudgetScope(kind=billing_service_pb2.SCOPE_KIND_TENANT, tenant_id="broke"),
                period=billing_service_pb2.BudgetPeriod(kind=billing_service_pb2.PERIOD_KIND_DAILY),
                amount=money_pb2.Money(currency_code="USD", micros=1),
                enforcement=billing_service_pb2.ENFORCEMENT_HARD), actor="test"), timeout=10)
    key = await create_key(mesh, "broke")
    sent: list[httpx.Request] = []
    with pytest.raises(openai.RateLimitError) as caught:
        sdk(mesh, key, sent, retries=2).chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=8)
    assert caught.value.code == "insufficient_quota"
    assert caught.value.response.headers["x-should-retry"] == "false"
    assert len(sent) == 1, "x-should-retry: false keeps the SDK from retrying"


async def test_a_rate_limited_key_gets_retry_after(mesh: Mesh) -> None:
    token = (mesh.data_dir / "router" / "admin_token").read_text().strip()
    async with router_channel(mesh) as channel:
        reply = await admin_service_pb2_grpc.AdminServiceStub(channel).CreateApiKey(
            admin_service_pb2.CreateApiKeyRequest(tenant_id="slow", name="one a minute",
                                                  limits=admin_service_pb2.KeyLimits(requests_per_minute=1)),
            metadata=(("authorization", f"Bearer {token}"),), timeout=10)
    client = sdk(mesh, reply.secret)
    client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    with pytest.raises(openai.RateLimitError) as caught:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    headers = caught.value.response.headers
    assert caught.value.code == "rate_limit_exceeded"
    assert int(headers["retry-after"]) >= 1 and int(headers["retry-after-ms"]) >= 1


def test_curl_streams_sse_chunks_as_they_are_generated(mesh: Mesh) -> None:
    body = json.dumps({"model": MODEL, "stream": True, "max_tokens": 64, "temperature": 0, "cache_policy": "bypass",
                       "messages": [{"role": "user", "content": "Count from one to one hundred."}]})
    curl = subprocess.Popen(
        ["curl", "-sSN", "--cacert", mesh.ca_cert, f"{mesh.openai_base_url}/chat/completions",
         "-H", f"authorization: Bearer {demo_key(mesh)}", "-H", "content-type: application/json", "-d", body],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert curl.stdout is not None
    try:
        first = curl.stdout.readline()
        assert first.startswith(b"data: {") and b'"role":"assistant"' in first, first
        assert curl.poll() is None, "the first chunk arrived only after the whole answer was generated"
        rest, errors = curl.communicate(timeout=300)
    finally:
        if curl.poll() is None:
            curl.kill()
            curl.wait()
    assert curl.returncode == 0, errors
    events = [line for line in (first + rest).split(b"\n\n") if line]
    assert all(e.startswith(b"data: ") for e in events) and events[-1] == b"data: [DONE]"
    # role, content (a consumer that falls behind gets what was generated meanwhile in one chunk), finish, [DONE]
    assert len(events) >= 4
    assert b'"finish_reason":"stop"' in events[-2] or b'"finish_reason":"length"' in events[-2]


def test_the_python_example_answers_and_streams(mesh: Mesh) -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples/openai/chat.py"), QUESTION], capture_output=True, text=True,
        timeout=300, env={**os.environ, "OPENAI_BASE_URL": mesh.openai_base_url, "OPENAI_API_KEY": demo_key(mesh),
                          "SSL_CERT_FILE": mesh.ca_cert})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() and "completion tokens" in result.stderr and "streamed:" in result.stderr


async def register_parity_model(mesh: Mesh, name: str) -> None:
    """`name` with versions v1 and v2 on the bundled model's replica, and a price whose cached rate is 0."""
    token = (mesh.data_dir / "router" / "admin_token").read_text().strip()
    metadata = (("authorization", f"Bearer {token}"),)
    async with router_channel(mesh) as channel:
        admin = admin_service_pb2_grpc.AdminServiceStub(channel)
        bundled = (await admin.GetModel(admin_service_pb2.GetModelRequest(model=MODEL), metadata=metadata,
                                        timeout=10)).model
        for version in ("v1", "v2"):
            await admin.RegisterModelVersion(admin_service_pb2.RegisterModelVersionRequest(
                model=name, version=version, replicas=bundled.versions[0].replicas), metadata=metadata, timeout=30)
        await admin.SetTrafficSplit(admin_service_pb2.SetTrafficSplitRequest(model=name, weights=[
            admin_service_pb2.VersionWeight(version="v1", weight_permille=700),
            admin_service_pb2.VersionWeight(version="v2", weight_permille=300)]), metadata=metadata, timeout=10)
    billing = load_endpoint(mesh.data_dir).billing
    usd = "USD"
    async with operator_channel(billing, billing_token(mesh.data_dir)) as channel:
        await billing_service_pb2_grpc.BillingServiceStub(channel).CreatePrice(billing_service_pb2.CreatePriceRequest(
            price=billing_service_pb2.Price(
                model=name, input_per_million=money_pb2.Money(currency_code=usd, micros=50_000),
                output_per_million=money_pb2.Money(currency_code=usd, micros=100_000),
                cached_per_million=money_pb2.Money(currency_code=usd, micros=0)), actor="test"), timeout=10)


async def test_a_cached_answer_over_http_says_so_costs_nothing_and_is_one_ledger_event(mesh: Mesh) -> None:
    await register_parity_model(mesh, "http-cache")
    key = await create_key(mesh, "http-cache")
    client = sdk(mesh, key)
    asked = {"model": "http-cache@v1", "messages": [{"role": "user", "content": QUESTION}], "max_tokens": 8,
             "temperature": 0}
    first, second = (client.chat.completions.create(**asked) for _ in range(2))  # type: ignore[call-overload]
    assert first.usage is not None and second.usage is not None
    assert (first.usage.model_extra or {})["cached"] is False and first.usage.model_extra["cost"]["micros"] > 0
    assert (second.usage.model_extra or {})["cached"] is True and second.usage.model_extra["cost"]["micros"] == 0
    assert second.choices[0].message.content == first.choices[0].message.content
    assert (second.usage.prompt_tokens, second.usage.completion_tokens) == (
        first.usage.prompt_tokens, first.usage.completion_tokens)
    totals = await settled(mesh, "http-cache", 2)
    assert totals.requests == 2 and totals.by_status == {"completed": 2}


async def test_a_canary_split_routes_http_requests_by_weight(mesh: Mesh) -> None:
    await register_parity_model(mesh, "http-canary")
    client = sdk(mesh, demo_key(mesh))
    versions = [(client.completions.create(model="http-canary", prompt=f"Count to {i}.", max_tokens=1,
                                           temperature=0).model_extra or {})["model_version"] for i in range(60)]
    # 300 per-mille to v2: 60 draws land 18 on average; below 6 or above 32 has odds under 1 in 10,000.
    assert set(versions) == {"v1", "v2"} and 6 <= versions.count("v2") <= 32, versions


def replica_metrics(mesh: Mesh) -> dict[str, float]:
    """The inference replica's engine gauges and counters, by name without the `autoglm_inference_` prefix."""
    doc = yaml.safe_load(mesh.config.read_text())
    text = httpx.get(f"http://127.0.0.1:{doc['inference']['metrics_port']}/metrics", timeout=10).text
    values = {}
    for line in text.splitlines():
        if line.startswith("autoglm_inference_") and "{" in line:
            name, value = line.split("{")[0].removeprefix("autoglm_inference_"), line.rsplit(" ", 1)[1]
            values[name] = float(value)
    return values


async def test_a_client_closing_after_5_chunks_stops_its_sequence_within_one_step_billed_as_cancelled(
        mesh: Mesh) -> None:
    key = await create_key(mesh, "http-hangup")
    before = replica_metrics(mesh)
    with sdk(mesh, key).chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Tell a long story about the sea."}], max_tokens=400,
            temperature=0, stream=True, extra_body={"cache_policy": "bypass"}) as stream:
        received = 0
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                received += 1
            if received == 5:
                break

    def ended() -> dict[str, float] | None:
        now = replica_metrics(mesh)
        done = now["active_sequences"] == 0 and now["cancelled_total"] == before["cancelled_total"] + 1
        return now if done else None

    after = await wait_until(ended, 30, "the replica ends the hung-up sequence")
    generated = after["tokens_generated_total"] - before["tokens_generated_total"]
    totals = await settled(mesh, "http-hangup", 1)
    assert totals.by_status == {"cancelled": 1}
    billed = totals.completion_tokens
    # The tokens billed are those the router received (a few may still have been on the wire from the
    # replica when the router cancelled); once the cancel reached the replica, it ran at most the one step
    # already under way.
    assert 5 <= billed <= generated, (billed, generated)
    assert after["steps_after_cancel_total"] - before.get("steps_after_cancel_total", 0) <= 1
