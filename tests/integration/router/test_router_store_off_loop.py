"""A call waiting on the router's database holds up that call only: while another connection holds the
lock its write needs (PostgreSQL: `LOCK TABLE ... IN ACCESS EXCLUSIVE MODE`; SQLite: `BEGIN EXCLUSIVE` on
the domain's file), the same router process keeps answering other callers (ListModels with an API key, the
health check) within a deadline, and the call completes once the lock is released. The calls: operator
calls (a traffic split, a new key), a batch submission, and (PostgreSQL) a key memory lacks, looked up."""

from __future__ import annotations

import asyncio
import sqlite3
import subprocess
import threading
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import psycopg
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from autoglm.router.v1 import admin_service_pb2 as admin_pb2
from autoglm.router.v1 import admin_service_pb2_grpc as admin_grpc
from autoglm.router.v1 import router_service_pb2 as pb2
from autoglm.router.v1 import router_service_pb2_grpc as router_grpc
from services.router.auth.api_keys import new_secret
from services.router.canary import CanaryMonitor
from services.router.lifecycle import VersionState
from services.router.registry import CanaryPolicy, Registry
from services.router.store import open_store
from services.router.store.postgres_store import SCHEMA
from tests.integration.billing.conftest import PgServer, postgres  # noqa: F401 - the session's PostgreSQL
from tests.integration.router.service_process import stop
from tests.integration.router.test_router_shared_store import ADMIN, start_router
from tests.integration.router.test_router_vertical import bearer
from tests.waiting import wait_until

UNREACHABLE = "127.0.0.1:9"  # no inference replica or billing behind it: these calls need neither
ANSWER_S = 3.0  # how long another caller may wait for an answer while an operator call waits on the database
RELEASED_S = 15.0  # how long the operator call may take once the lock is released
SQLITE_WINDOW_S = 1.0  # how long the SQLite case keeps asking while the write waits (its busy timeout is 10 s)


@dataclass
class Operation:
    name: str
    table: str  # the table (PostgreSQL) and domain file (SQLite) its write needs
    call: Callable[[], Awaitable[Any]]
    done: Callable[[Any], bool]  # whether the answer shows the change made


OPERATIONS = ("SetTrafficSplit", "CreateApiKey", "SubmitBatch")
# Only on PostgreSQL: a SQLite file in WAL mode is read while another connection holds its write lock.
PG_ONLY = ("a key this router has not seen",)
SQLITE_FILES = {"models": "registry.db", "api_keys": "keys.db", "jobs": "jobs.db"}


def operation(name: str, channel: grpc.aio.Channel, secret: str) -> Operation:
    admin, router = admin_grpc.AdminServiceStub(channel), router_grpc.RouterServiceStub(channel)
    split = admin_pb2.SetTrafficSplitRequest(model="m", weights=[
        admin_pb2.VersionWeight(version="v1", weight_permille=900),
        admin_pb2.VersionWeight(version="v2", weight_permille=100)])
    batch = pb2.SubmitBatchRequest(model="m", items=[pb2.BatchItem(custom_id="a", prompt="hello")])
    return {op.name: op for op in (
        Operation("SetTrafficSplit", "models", lambda: admin.SetTrafficSplit(split, metadata=ADMIN, timeout=60),
                  lambda reply: [v.weight_permille for v in reply.model.versions] == [900, 100]),
        Operation("CreateApiKey", "api_keys", lambda: admin.CreateApiKey(
            admin_pb2.CreateApiKeyRequest(tenant_id="acme", name="made-while-locked"), metadata=ADMIN, timeout=60),
            lambda reply: bool(reply.secret) and reply.api_key.name == "made-while-locked"),
        Operation("SubmitBatch", "jobs", lambda: router.SubmitBatch(batch, metadata=bearer(secret), timeout=60),
                  lambda reply: reply.job.job_id.startswith("job_")),
        Operation("a key this router has not seen", "api_keys", lambda: refusal(router.ListModels(
            pb2.ListModelsRequest(), metadata=bearer(new_secret()), timeout=60)),
            lambda code: code == grpc.StatusCode.UNAUTHENTICATED),
    )}[name]


async def refusal(call: Awaitable[object]) -> grpc.StatusCode | None:
    try:
        await call
    except grpc.aio.AioRpcError as error:
        return error.code()
    return None



async def prepare(channel: grpc.aio.Channel) -> str:
    """A key for the other caller and a model with two versions to split; returns the key's secret."""
    admin = admin_grpc.AdminServiceStub(channel)
    for version in ("v1", "v2"):
        await admin.RegisterModelVersion(admin_pb2.RegisterModelVersionRequest(
            model="m", version=version, replicas=[admin_pb2.Replica(address=UNREACHABLE)]), metadata=ADMIN, timeout=30)
    created = await admin.CreateApiKey(admin_pb2.CreateApiKeyRequest(tenant_id="acme", name="other caller"),
                                       metadata=ADMIN, timeout=30)
    return created.secret


async def answers_others(channel: grpc.aio.Channel, secret: str, what: str) -> None:
    """The router answers another API caller and the health check, each within ANSWER_S."""
    models = await router_grpc.RouterServiceStub(channel).ListModels(
        pb2.ListModelsRequest(), metadata=bearer(secret), timeout=ANSWER_S)
    assert [m.name for m in models.models] == ["m"], what
    health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=ANSWER_S)
    assert health.status == health_pb2.HealthCheckResponse.SERVING, what


def waiting_on_locks(dsn: str) -> int:
    """How many backends of this database wait for a lock (the router's blocked write is one)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                           " AND wait_event_type = 'Lock'").fetchone()
    return int(row[0]) if row else 0


@contextmanager
def pg_table_locked(dsn: str, table: str) -> Iterator[None]:
    with psycopg.connect(dsn) as conn:
        conn.execute(f"LOCK TABLE {SCHEMA}.{table} IN ACCESS EXCLUSIVE MODE")
        try:
            yield
        finally:
            conn.rollback()


@contextmanager
def sqlite_file_locked(path: Path) -> Iterator[None]:
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("BEGIN EXCLUSIVE")
        yield
        conn.execute("ROLLBACK")
    finally:
        conn.close()


@pytest.mark.parametrize("name", OPERATIONS + PG_ONLY)
async def test_an_operator_call_waiting_on_a_locked_postgresql_table_leaves_the_router_answering_others(
    postgres: PgServer, tmp_path: Path, name: str,  # noqa: F811
) -> None:
    dsn = postgres.create_database()
    processes: list[subprocess.Popen[bytes]] = []
    try:
        address = start_router(tmp_path, "router", dsn, UNREACHABLE, UNREACHABLE, processes)
        async with grpc.aio.insecure_channel(address) as channel:
            secret = await prepare(channel)
            op = operation(name, channel, secret)
            with pg_table_locked(dsn, op.table):
                pending = asyncio.ensure_future(op.call())
                await wait_until(lambda: waiting_on_locks(dsn), 30, f"{name} to wait for the lock on {op.table}")
                await answers_others(channel, secret, f"while {name} waits on the database")
                assert not pending.done(), f"{name} finished while its table was locked"
            assert op.done(await asyncio.wait_for(pending, RELEASED_S))  # completed once the lock was gone
    finally:
        stop(processes)


@pytest.mark.parametrize("name", OPERATIONS)
async def test_an_operator_call_waiting_on_a_locked_sqlite_file_leaves_the_router_answering_others(
    tmp_path: Path, name: str,
) -> None:
    processes: list[subprocess.Popen[bytes]] = []
    try:
        address = start_router(tmp_path, "router", "", UNREACHABLE, UNREACHABLE, processes)
        async with grpc.aio.insecure_channel(address) as channel:
            secret = await prepare(channel)
            op = operation(name, channel, secret)
            loop = asyncio.get_running_loop()
            with sqlite_file_locked(tmp_path / "router" / SQLITE_FILES[op.table]):
                pending = asyncio.ensure_future(op.call())
                # Nothing outside the router shows its write waiting for SQLite's lock: keep asking for a while
                # (the write reaches the file within milliseconds, and waits up to its busy timeout).
                until = loop.time() + SQLITE_WINDOW_S
                while loop.time() < until:
                    await answers_others(channel, secret, f"while {name} waits on the database")
                assert not pending.done(), f"{name} finished while its file was locked"
            assert op.done(await asyncio.wait_for(pending, RELEASED_S))  # completed once the lock was gone
    finally:
        stop(processes)


async def test_a_canary_rollback_waiting_on_a_locked_postgresql_table_leaves_the_event_loop_serving(
    postgres: PgServer,  # noqa: F811
) -> None:
    """The request that finds a canary failing waits for the rollback's write; the event loop goes on (here
    a coroutine on it sees the write waiting and releases the lock; a timer thread would release it
    otherwise, late)."""
    dsn = postgres.create_database()
    registry = Registry(open_store(dsn))
    try:
        registry.register("m", "v1", (UNREACHABLE,))
        registry.register("m", "v2", (UNREACHABLE,), canary=CanaryPolicy(min_requests=1))
        registry.set_split("m", {"v1": 900, "v2": 100})
        released_by: list[str] = []
        guard = threading.Lock()
        with psycopg.connect(dsn) as conn:
            conn.execute(f"LOCK TABLE {SCHEMA}.models IN ACCESS EXCLUSIVE MODE")

            def release(who: str) -> None:
                with guard:
                    if not released_by:
                        conn.rollback()
                        released_by.append(who)

            async def release_once_waiting() -> None:
                await wait_until(lambda: waiting_on_locks(dsn), 30, "the rollback to wait for the lock on models")
                release("the event loop")

            late = threading.Timer(RELEASED_S, release, ("a timer thread",))
            late.start()
            releaser = asyncio.ensure_future(release_once_waiting())
            try:
                assert await CanaryMonitor(registry).record("m", "v2", ok=False, latency_s=0.01)
                assert released_by == ["the event loop"]
            finally:
                late.cancel()
                releaser.cancel()
                release("the test's end")
        model = registry.get("m")
        assert model.version("v2").state is VersionState.PENDING_APPROVAL and model.version("v1").weight_permille == 1000
    finally:
        registry.close()
