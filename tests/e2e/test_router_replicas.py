"""Three routers as one: `autoglm up` with `router.replicas: 3` on one real PostgreSQL and one real Redis,
two inference replicas and the real model. Each router (A, B, C) is reached directly on its own port, and
all three through the public edge, which balances them."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import ssl
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import psycopg
import pytest

from autoglm.billing.v1 import billing_service_pb2 as billing_pb2
from autoglm.billing.v1 import billing_service_pb2_grpc as billing_grpc
from autoglm.common.v1 import generation_pb2
from autoglm.router.v1 import admin_service_pb2 as admin_pb2
from autoglm.router.v1 import admin_service_pb2_grpc as admin_grpc
from autoglm.router.v1 import router_service_pb2 as pb2
from autoglm.router.v1 import router_service_pb2_grpc as router_grpc
from services.cli.endpoint import operator_channel
from tests.conftest import require_real_component
from tests.e2e.mesh_process import Mesh, start_mesh, stop_mesh
from tests.integration.billing.conftest import PgServer, postgres  # noqa: F401 - the session's PostgreSQL
from tests.integration.router.test_router_shared_store import accepted
from tests.settlement import settled_usage
from tests.waiting import wait_until, wait_until_blocking

MODEL = "smollm2-135m-instruct"
PROPAGATION_S = 1.0
REDIS_SERVER = shutil.which("redis-server")
REFUSALS = (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE)
GREEDY = generation_pb2.SamplingParams(temperature=0.0, max_tokens=4)


@dataclass
class Routers:
    mesh: Mesh
    dsn: str
    direct: list[str]  # A, B, C: each router's own gRPC port (plaintext on loopback)
    admin_token: str
    ca: bytes  # the mesh CA, for the public edge's TLS

    @property
    def admin(self) -> list[tuple[str, str]]:
        return [("authorization", f"Bearer {self.admin_token}")]


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    require_real_component(REDIS_SERVER is not None, "redis-server", "`make redis-server`, or apt-get install redis-server")
    assert REDIS_SERVER is not None
    directory = Path(tempfile.mkdtemp(prefix="autoglm-redis-"))
    sock = directory / "redis.sock"
    process = subprocess.Popen([REDIS_SERVER, "--port", "0", "--unixsocket", str(sock), "--unixsocketperm", "700",
                                "--save", "", "--appendonly", "no", "--dir", str(directory)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        import redis

        def serving() -> bool:
            try:
                return sock.exists() and bool(redis.Redis(unix_socket_path=str(sock)).ping())
            except redis.RedisError:
                return False

        wait_until_blocking(serving, 10, "redis-server to answer PING", interval=0.05)
        yield f"unix://{sock}"
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=10)
        shutil.rmtree(directory, ignore_errors=True)


@contextlib.contextmanager
def launch(postgres: PgServer, redis_url: str, tmp: Path, *extra_args: str) -> Iterator[Routers]:  # noqa: F811
    dsn = postgres.create_database()
    processes: list[subprocess.Popen[bytes]] = []
    # Two inference replicas and three routers share two cores: one ONNX thread each, no busy-waiting.
    mesh = start_mesh(tmp, processes, replicas=2, extra_args=extra_args, extra_config={
        "router": {"replicas": 3, "database": dsn, "rate_limit_redis_url": redis_url},
        "inference": {"intra_op_threads": 1, "allow_spinning": False}})
    try:
        endpoint = json.loads((mesh.data_dir / "endpoint.json").read_text())
        direct = [r["grpc"] for r in endpoint["routers"]]
        assert len(direct) == 3
        token = (mesh.data_dir / "router" / "admin_token").read_text().strip()
        yield Routers(mesh, dsn, direct, token, Path(mesh.ca_cert).read_bytes())
    finally:
        stop_mesh(mesh)


@pytest.fixture(scope="module")
def routers(postgres: PgServer, redis_url: str, tmp_path_factory: pytest.TempPathFactory  # noqa: F811
            ) -> Iterator[Routers]:
    with launch(postgres, redis_url, tmp_path_factory.mktemp("replicas")) as running:
        yield running


@pytest.fixture
def envoy_routers(postgres: PgServer, redis_url: str, tmp_path: Path) -> Iterator[Routers]:  # noqa: F811
    with launch(postgres, redis_url, tmp_path, "--sidecar", "envoy") as running:
        yield running


@pytest.fixture
async def stubs(routers: Routers) -> AsyncIterator[tuple[list[router_grpc.RouterServiceStub],
                                                         list[admin_grpc.AdminServiceStub],
                                                         router_grpc.RouterServiceStub]]:
    channels = [grpc.aio.insecure_channel(a) for a in routers.direct]
    edge = grpc.aio.secure_channel(routers.mesh.router, grpc.ssl_channel_credentials(root_certificates=routers.ca),
                                   options=[("grpc.ssl_target_name_override", "router")])
    try:
        yield ([router_grpc.RouterServiceStub(c) for c in channels], [admin_grpc.AdminServiceStub(c) for c in channels],
               router_grpc.RouterServiceStub(edge))
    finally:
        for channel in [*channels, edge]:
            await channel.close()


def bearer(secret: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {secret}")]


async def create_key(routers: Routers, admin: admin_grpc.AdminServiceStub, tenant: str, rpm: int = 0) -> str:
    reply = await admin.CreateApiKey(admin_pb2.CreateApiKeyRequest(
        tenant_id=tenant, limits=admin_pb2.KeyLimits(requests_per_minute=rpm)), metadata=routers.admin, timeout=10)
    return str(reply.secret)


async def test_a_key_made_through_a_works_through_b_c_and_the_edge_and_its_revocation_through_c_reaches_all(
        routers: Routers, stubs) -> None:
    direct, admin, edge = stubs
    reply = await admin[0].CreateApiKey(admin_pb2.CreateApiKeyRequest(tenant_id="shared-key"),
                                        metadata=routers.admin, timeout=10)
    for router in (*direct, edge):  # at once, with no wait
        assert await accepted(router, reply.secret)
    await admin[2].RevokeApiKey(admin_pb2.RevokeApiKeyRequest(key_id=reply.api_key.key_id),
                                metadata=routers.admin, timeout=10)
    began = time.monotonic()
    assert not await accepted(direct[2], reply.secret)
    for name, router in (("A", direct[0]), ("B", direct[1])):
        async def refused(router: router_grpc.RouterServiceStub = router) -> bool:
            return not await accepted(router, reply.secret)

        await wait_until(refused, PROPAGATION_S - (time.monotonic() - began),
                         f"router {name} to refuse the key revoked through router C")
    assert not await accepted(edge, reply.secret)


async def test_a_model_version_registered_through_a_is_routed_by_b_and_c(routers: Routers, stubs) -> None:
    direct, admin, _ = stubs
    current = (await admin[0].GetModel(admin_pb2.GetModelRequest(model=MODEL), metadata=routers.admin,
                                       timeout=10)).model
    replicas = current.versions[0].replicas
    assert len(replicas) == 2
    await admin[0].RegisterModelVersion(admin_pb2.RegisterModelVersionRequest(
        model=MODEL, version="shared-v2", replicas=replicas), metadata=routers.admin, timeout=10)
    secret = await create_key(routers, admin[0], "shared-model")
    for router in direct[1:]:
        async def routed(router: router_grpc.RouterServiceStub = router) -> bool:
            try:
                reply = await router.Complete(pb2.CompleteRequest(
                    model=f"{MODEL}@shared-v2", prompt="Say yes.", sampling=GREEDY), metadata=bearer(secret),
                    timeout=120)
            except grpc.aio.AioRpcError as error:
                assert error.code() == grpc.StatusCode.NOT_FOUND, error
                return False
            assert reply.model_version == "shared-v2"
            return True

        await wait_until(routed, PROPAGATION_S + 120, "router B / C to route the version registered through A")


async def test_a_conversation_continued_through_a_b_and_c_in_turn_keeps_every_turn_in_order(
        routers: Routers, stubs) -> None:
    direct, admin, _ = stubs
    secret = await create_key(routers, admin[0], "shared-context")
    sent = [f"Remember the number {n}." for n in range(1, 7)]
    prompt_tokens = []
    for turn, text in enumerate(sent):
        reply = await direct[turn % 3].Complete(pb2.CompleteRequest(
            model=MODEL, prompt=text, context_id="three-routers", sampling=GREEDY), metadata=bearer(secret),
            timeout=120)
        prompt_tokens.append(reply.usage.prompt_tokens)
    # Each turn's prompt replays every earlier one, whichever router took it.
    assert prompt_tokens == sorted(prompt_tokens) and len(set(prompt_tokens)) == len(sent), prompt_tokens
    with psycopg.connect(routers.dsn) as conn:
        rows = conn.execute("SELECT role, content FROM router.turns WHERE tenant_id = %s AND context_id = %s "
                            "ORDER BY seq", ("shared-context", "three-routers")).fetchall()
    users = [content for role, content in rows if role == generation_pb2.CHAT_ROLE_USER]
    assert users == sent
    assert len(rows) == 2 * len(sent)


async def test_one_requests_per_minute_limit_of_60_holds_across_the_three_routers(routers: Routers, stubs) -> None:
    direct, admin, _ = stubs
    secret = await create_key(routers, admin[0], "shared-limit", rpm=60)

    async def call(router: router_grpc.RouterServiceStub) -> bool:
        try:
            await router.Complete(pb2.CompleteRequest(model=MODEL, prompt="Count to three.", sampling=GREEDY),
                                  metadata=bearer(secret), timeout=120)
            return True
        except grpc.aio.AioRpcError as error:
            assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error
            return False

    # The bucket starts with a minute's allowance: spend it first (each router's answer then comes from
    # its response cache, so the routers, not the model, set the pace).
    spent = 0
    while await call(direct[spent % 3]):
        spent += 1
        assert spent <= 70, "more than a minute's allowance admitted at once"
    # Then 60 s of load spread over the three: the refill (60 a minute) is all that is admitted.
    admitted, began, sent = 0, time.monotonic(), 0
    while time.monotonic() - began < 60:
        results = await asyncio.gather(*(call(router) for router in direct))
        admitted += sum(results)
        sent += len(results)
        await asyncio.sleep(0.25)  # paced load, not a synchronisation: the count is what is asserted
    assert sent > 120, f"only {sent} requests in 60 s: the load did not exceed the limit"
    assert 57 <= admitted <= 63, f"{admitted} of {sent} admitted over 60 s against a limit of 60/min"


async def test_a_thousand_concurrent_requests_over_three_routers_spend_95_percent_of_a_hard_budget_never_more(
        routers: Routers, stubs) -> None:
    direct, admin, _ = stubs
    tenant = "shared-budget"
    secret = await create_key(routers, admin[0], tenant)
    endpoint = json.loads((routers.mesh.data_dir / "endpoint.json").read_text())
    operator = (routers.mesh.data_dir / "billing_operator_token").read_text().strip()
    max_tokens = 2
    sizing = await direct[0].Complete(pb2.CompleteRequest(
        model=MODEL, prompt="request 0000", sampling=generation_pb2.SamplingParams(temperature=0.0,
                                                                                max_tokens=max_tokens)),
        metadata=bearer(await create_key(routers, admin[0], "sizing")), timeout=120)
    per_request = sizing.usage.prompt_tokens + max_tokens  # the most one request may cost
    limit = 100 * per_request
    async with operator_channel(endpoint["billing_operator"], operator) as channel:
        billing = billing_grpc.BillingServiceStub(channel)
        created = await billing.CreateBudget(billing_pb2.CreateBudgetRequest(budget=billing_pb2.Budget(
            scope=billing_pb2.BudgetScope(kind=billing_pb2.SCOPE_KIND_TENANT, tenant_id=tenant),
            period=billing_pb2.BudgetPeriod(kind=billing_pb2.PERIOD_KIND_MONTHLY, time_zone="UTC"),
            tokens=limit, enforcement=billing_pb2.ENFORCEMENT_HARD), actor="test"), timeout=10)

        async def call(i: int) -> str:
            try:
                await direct[i % 3].Complete(pb2.CompleteRequest(
                    model=MODEL, prompt=f"request {i:04d}", sampling=generation_pb2.SamplingParams(
                        temperature=0.0, max_tokens=max_tokens)), metadata=bearer(secret), timeout=300)
                return "OK"
            except grpc.aio.AioRpcError as error:
                # Refusals: the budget (FAILED_PRECONDITION), a full queue (RESOURCE_EXHAUSTED), or billing
                # too slow to answer under this load, which fails closed (UNAVAILABLE, retry later).
                assert error.code() in REFUSALS, error
                return str(error.code().name)

        outcomes = await asyncio.gather(*(call(i) for i in range(1000)))
        admitted = outcomes.count("OK")

        async def read() -> billing_pb2.BudgetStatus:
            return (await billing.GetBudget(billing_pb2.GetBudgetRequest(budget_id=created.budget.budget_id),
                                            timeout=10)).status

        # Every router's usage settled and billing's spend still. (A hold whose request ended while billing
        # was too slow to answer under this load stays held until its TTL: it only lowers the room.)
        status = await settled_usage(read, lambda s: int(s.spent_tokens), admitted, "the budget's tenant",
                                     [routers.mesh.data_dir / n for n in ("router", "router-1", "router-2")])
    counts = {name: outcomes.count(name) for name in sorted(set(outcomes))}
    assert 0 < admitted < 1000, counts
    assert status.spent_tokens <= limit, f"spent {status.spent_tokens} tokens of a hard budget of {limit}: {counts}"
    # Exact bounds and leases that shrink near the limit leave little of the budget unusable: the admitted
    # requests spend at least 95 % of it, however the three routers' leases were split.
    assert status.spent_tokens >= 0.95 * limit, \
        f"only {status.spent_tokens} of {limit} tokens spent ({100 * status.spent_tokens / limit:.1f} %): {counts}"


def served_by(routers: Routers, request_ids: set[str]) -> dict[str, int]:
    """How many of `request_ids` each router's access log shows."""
    counts = {}
    for name in ("router", "router-1", "router-2"):
        log = (routers.mesh.data_dir / "logs" / f"{name}.log").read_text(errors="replace")
        counts[name] = sum(1 for rid in request_ids if f'"request_id": "{rid}"' in log)
    return counts


async def test_the_public_grpc_and_https_ports_spread_calls_over_the_three_routers(routers: Routers, stubs) -> None:
    import httpx

    direct, admin, edge = stubs
    secret = await create_key(routers, admin[0], "shared-edge")
    # The test before overloads billing on purpose, and a router may still hold its breaker to billing open:
    # each router is called directly, retried as the UNAVAILABLE status asks, until it answers (a deadline
    # bounds it); the calls counted below go through the edge.
    deadline = time.monotonic() + 90
    for n, router in enumerate(direct):
        while True:
            try:
                await router.Complete(pb2.CompleteRequest(model=MODEL, prompt="Say hi.", sampling=GREEDY),
                                      metadata=[*bearer(secret), ("x-request-id", f"edge-ready-{n}")], timeout=120)
                break
            except grpc.aio.AioRpcError as error:
                if error.code() != grpc.StatusCode.UNAVAILABLE or time.monotonic() > deadline:
                    raise
                await asyncio.sleep(1)
    grpc_ids = {f"edge-grpc-{uuid}" for uuid in range(9)}
    for rid in sorted(grpc_ids):
        await edge.Complete(pb2.CompleteRequest(model=MODEL, prompt="Say hi.", sampling=GREEDY),
                            metadata=[*bearer(secret), ("x-request-id", rid)], timeout=120)
    http_ids = {f"edge-http-{uuid}" for uuid in range(9)}
    context = ssl.create_default_context(cadata=routers.ca.decode())
    context.check_hostname = False  # the mesh certificate names the router's SPIFFE id, not 127.0.0.1
    for rid in sorted(http_ids):  # a connection each: the balancer places connections
        async with httpx.AsyncClient(verify=context, timeout=120) as client:
            reply = await client.post(f"{routers.mesh.openai_base_url}/completions", json={
                "model": MODEL, "prompt": "Say hi.", "max_tokens": 4, "temperature": 0},
                headers={"authorization": f"Bearer {secret}", "x-request-id": rid})
        assert reply.status_code == 200, reply.text
    for ids, what in ((grpc_ids, "gRPC"), (http_ids, "HTTPS")):
        def logged(ids: set[str] = ids) -> dict[str, int] | None:
            counts = served_by(routers, ids)
            return counts if sum(counts.values()) == len(ids) else None

        counts = await wait_until(logged, 10, f"every {what} call in a router's access log")
        assert all(counts.values()), f"{what} calls through the edge reached only some routers: {counts}"


async def test_with_envoy_as_the_edge_a_key_works_through_every_router_and_calls_spread_over_them(
        envoy_routers: Routers) -> None:
    routers, mesh = envoy_routers, envoy_routers.mesh
    edge = grpc.aio.secure_channel(mesh.router, grpc.ssl_channel_credentials(root_certificates=routers.ca),
                                   options=[("grpc.ssl_target_name_override", "router")])
    async with grpc.aio.insecure_channel(routers.direct[0]) as a:
        secret = await create_key(routers, admin_grpc.AdminServiceStub(a), "envoy-edge")
    async with edge:
        stub = router_grpc.RouterServiceStub(edge)
        grpc_ids = {f"envoy-grpc-{i}" for i in range(9)}
        # Concurrent: Envoy's least-request choice then has loads to compare.
        await asyncio.gather(*(stub.Complete(pb2.CompleteRequest(model=MODEL, prompt="Say hi.", sampling=GREEDY),
                                             metadata=[*bearer(secret), ("x-request-id", rid)], timeout=120)
                               for rid in sorted(grpc_ids)))
    import httpx

    http_ids = {f"envoy-http-{i}" for i in range(9)}
    context = ssl.create_default_context(cadata=routers.ca.decode())
    context.check_hostname = False
    async with httpx.AsyncClient(verify=context, timeout=120) as client:
        replies = await asyncio.gather(*(client.post(f"{mesh.openai_base_url}/completions", json={
            "model": MODEL, "prompt": "Say hi.", "max_tokens": 4, "temperature": 0},
            headers={"authorization": f"Bearer {secret}", "x-request-id": rid}) for rid in sorted(http_ids)))
    assert all(r.status_code == 200 for r in replies), [r.text for r in replies if r.status_code != 200]
    for ids, what in ((grpc_ids, "gRPC"), (http_ids, "HTTPS")):
        def logged(ids: set[str] = ids) -> dict[str, int] | None:
            counts = served_by(routers, ids)
            return counts if sum(counts.values()) == len(ids) else None

        counts = await wait_until(logged, 10, f"every {what} call in a router's access log")
        assert sum(1 for c in counts.values() if c) >= 2, f"Envoy sent every {what} call to one router: {counts}"
