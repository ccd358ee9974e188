"""Model version states on a shared PostgreSQL store.

On both backends: a store from before states is migrated with its versions ACTIVE. In process: many registries on one database racing to roll back the same failing canary roll it back
once, with one audit event. As processes (two real routers on one PostgreSQL, real billing and an
inference replica with the model): a split naming a non-ACTIVE version is refused with
FAILED_PRECONDITION naming its state; a version moved to DEPRECATED through router A stops receiving
unpinned traffic on router B within 1 s, while a request pinned to it is served with the deprecation
trailer; once RETIRED, B refuses the pinned request naming the state; and a canary failing on both
routers is rolled back to PENDING_APPROVAL exactly once, with one audit event.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import threading
from pathlib import Path

import grpc
import pytest

from autoglm.billing.v1 import billing_service_pb2 as billing_pb2
from autoglm.billing.v1 import billing_service_pb2_grpc as billing_grpc
from autoglm.common.v1 import generation_pb2, money_pb2
from autoglm.router.v1 import admin_service_pb2 as admin_pb2
from autoglm.router.v1 import admin_service_pb2_grpc as admin_grpc
from autoglm.router.v1 import model_lifecycle_pb2 as lifecycle_pb2
from autoglm.router.v1 import router_service_pb2 as pb2
from autoglm.router.v1 import router_service_pb2_grpc as router_grpc
from services.cli.endpoint import billing_token, operator_channel
from services.common.ports import free_port
from services.router.lifecycle import VersionState
from services.router.registry import CanaryPolicy, Registry
from services.router.store import Store, open_store
from services.router.store.migrations import REGISTRY
from tests.integration.billing.conftest import PgServer, postgres  # noqa: F401 - the session's PostgreSQL
from tests.integration.router.conftest import ADMIN_TOKEN, MODEL
from tests.integration.router.service_process import drain, start_service, stop
from tests.integration.router.test_router_shared_store import start_router
from tests.integration.router.test_router_vertical import bearer
from tests.waiting import wait_until

ADMIN = [("authorization", f"Bearer {ADMIN_TOKEN}")]
PROPAGATION_S = 1.0  # a change made through one router reaches every other within this
DEPRECATION_KEY = "autoglm-deprecation"
RACERS = 6


@pytest.fixture(params=["sqlite", "postgres"])
def database(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh, empty database of each kind."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'router.db'}"
    server: PgServer = request.getfixturevalue("postgres")
    return server.create_database()


def test_versions_stored_before_states_are_migrated_as_active(database: str) -> None:
    old = open_store(database)
    old.migrate("registry", REGISTRY[:2])  # the schema before version states
    body = {"name": "m", "fallback_models": [], "context_window": 0, "versions": [
        {"version": "v1", "replicas": ["127.0.0.1:1"], "weight_permille": 900, "stable": True,
         "canary": CanaryPolicy().__dict__},
        {"version": "v2", "replicas": ["127.0.0.1:2"], "weight_permille": 100, "stable": False,
         "canary": CanaryPolicy().__dict__}]}
    old.write(lambda tx: tx.execute("INSERT INTO models (name, body, version) VALUES (?, ?, 1)",
                                    ("m", json.dumps(body))))
    old.close()
    store = open_store(database)
    try:
        registry = Registry(store)
        stored = store.read(lambda tx: tx.one("SELECT body FROM models WHERE name = 'm'"))
        assert stored is not None
        assert [v["state"] for v in json.loads(stored["body"])["versions"]] == ["ACTIVE", "ACTIVE"]
        assert [v.state.name for v in registry.get("m").versions] == ["ACTIVE", "ACTIVE"]
        registry.set_state("m", "v2", VersionState.DEPRECATED, "ops", "superseded")
        assert registry.get("m").version("v1").weight_permille == 1000
        assert [(c.version, c.to_state.name, c.actor) for c in registry.history("m")] == [("v2", "DEPRECATED", "ops")]
    finally:
        store.close()


def test_registries_racing_to_roll_back_one_canary_roll_it_back_once(postgres: PgServer) -> None:  # noqa: F811
    dsn = postgres.create_database()
    stores: list[Store] = [open_store(dsn) for _ in range(RACERS)]
    try:
        first = Registry(stores[0])
        first.register("m", "v1", ("127.0.0.1:1",))
        first.register("m", "v2", ("127.0.0.1:2",))
        first.set_split("m", {"v1": 800, "v2": 200})
        registries = [first, *(Registry(store) for store in stores[1:])]  # each reads the canary as ACTIVE
        start = threading.Barrier(RACERS)
        decided: list[bool] = []

        def race(registry: Registry, index: int) -> None:
            start.wait()
            decided.append(registry.rollback_canary("m", "v2", f"verdict of router {index}"))

        threads = [threading.Thread(target=race, args=(r, i)) for i, r in enumerate(registries)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=30)
        assert sorted(decided) == [False] * (RACERS - 1) + [True]
        [event] = first.audit_events("model.rollback")
        assert event.details["states"] == {"v2": "PENDING_APPROVAL"}
        stored = Registry(stores[0]).get("m")
        assert stored.version("v2").state.name == "PENDING_APPROVAL" and stored.version("v1").weight_permille == 1000
        assert [c.to_state.name for c in first.history("m") if c.version == "v2"] == ["ACTIVE", "PENDING_APPROVAL"]
    finally:
        for store in stores:
            store.close()


def complete(model: str, prompt: str) -> pb2.CompleteRequest:
    return pb2.CompleteRequest(model=model, prompt=prompt, cache_policy=pb2.CACHE_POLICY_BYPASS,
                               sampling=generation_pb2.SamplingParams(temperature=0.0, max_tokens=2))


async def state_of(admin: admin_grpc.AdminServiceStub, version: str) -> tuple[str, int]:
    model = (await admin.GetModel(admin_pb2.GetModelRequest(model=MODEL), metadata=ADMIN, timeout=10)).model
    record = next(v for v in model.versions if v.version == version)
    return lifecycle_pb2.VersionState.Name(record.state), record.weight_permille


async def test_states_set_through_one_router_rule_another_and_a_failing_canary_is_rolled_back_once(
    postgres: PgServer, tmp_path: Path,  # noqa: F811
) -> None:
    dsn = postgres.create_database()
    processes: list[subprocess.Popen[bytes]] = []
    try:
        billing_proc, billing = start_service("billing", ["--data-dir", str(tmp_path / "billing")], processes)
        drain(billing_proc)
        inference_proc, inference = start_service("inference", ["--replica-id", "r1", "--threads", "1"], processes)
        drain(inference_proc)
        async with operator_channel(billing, billing_token(tmp_path / "billing")) as billing_channel:
            await billing_grpc.BillingServiceStub(billing_channel).CreatePrice(billing_pb2.CreatePriceRequest(
                price=billing_pb2.Price(model=MODEL, input_per_million=money_pb2.Money(currency_code="USD", micros=1),
                                        output_per_million=money_pb2.Money(currency_code="USD", micros=2)),
                actor="test"), timeout=10)
        a = start_router(tmp_path, "a", dsn, inference, billing, processes)
        b = start_router(tmp_path, "b", dsn, inference, billing, processes)
        async with grpc.aio.insecure_channel(a) as channel_a, grpc.aio.insecure_channel(b) as channel_b:
            admin_a, admin_b = admin_grpc.AdminServiceStub(channel_a), admin_grpc.AdminServiceStub(channel_b)
            router_a, router_b = router_grpc.RouterServiceStub(channel_a), router_grpc.RouterServiceStub(channel_b)
            key = await admin_a.CreateApiKey(admin_pb2.CreateApiKeyRequest(tenant_id="acme"), metadata=ADMIN,
                                             timeout=10)
            caller = bearer(key.secret)
            model = (await admin_a.GetModel(admin_pb2.GetModelRequest(model=MODEL), metadata=ADMIN, timeout=10)).model
            stable = next(v.version for v in model.versions if v.stable)

            # A version registered for approval takes no split.
            await admin_a.RegisterModelVersion(admin_pb2.RegisterModelVersionRequest(
                model=MODEL, version="v2", replicas=[admin_pb2.Replica(address=inference)],
                initial_state=lifecycle_pb2.VERSION_STATE_PENDING_APPROVAL), metadata=ADMIN, timeout=10)
            split = admin_pb2.SetTrafficSplitRequest(model=MODEL, weights=[
                admin_pb2.VersionWeight(version=stable, weight_permille=500),
                admin_pb2.VersionWeight(version="v2", weight_permille=500)])
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await admin_b.SetTrafficSplit(split, metadata=ADMIN, timeout=10)
            assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert f"{MODEL}@v2 is PENDING_APPROVAL" in refused.value.details()

            # Approved through B, split through A; then deprecated through A: B stops sending it unpinned
            # traffic within 1 s, and serves requests pinned to it with the deprecation trailer.
            await admin_b.SetVersionState(admin_pb2.SetVersionStateRequest(
                model=MODEL, version="v2", state=lifecycle_pb2.VERSION_STATE_ACTIVE, operator="bob",
                reason="approved"), metadata=ADMIN, timeout=10)
            await admin_a.SetTrafficSplit(split, metadata=ADMIN, timeout=10)
            await wait_until(lambda: _is(admin_b, "v2", ("VERSION_STATE_ACTIVE", 500)), PROPAGATION_S,
                             "router B to follow the split set through router A")
            await admin_a.SetVersionState(admin_pb2.SetVersionStateRequest(
                model=MODEL, version="v2", state=lifecycle_pb2.VERSION_STATE_DEPRECATED, operator="alice",
                reason="superseded"), metadata=ADMIN, timeout=10)
            await wait_until(lambda: _is(admin_b, "v2", ("VERSION_STATE_DEPRECATED", 0)), PROPAGATION_S,
                             "router B to stop splitting traffic to the version deprecated through router A")
            replies = [await router_b.Complete(complete(MODEL, f"Say {i}."), metadata=caller, timeout=60)
                       for i in range(8)]
            assert {r.model_version for r in replies} == {stable}
            call = router_b.Complete(complete(f"{MODEL}@v2", "Pinned."), metadata=caller, timeout=60)
            pinned = await call
            trailers = dict(await call.trailing_metadata())
            assert pinned.model_version == "v2" and "DEPRECATED" in trailers[DEPRECATION_KEY]
            unpinned = router_b.Complete(complete(MODEL, "Unpinned."), metadata=caller, timeout=60)
            await unpinned
            assert DEPRECATION_KEY not in dict(await unpinned.trailing_metadata())

            # Retired through A: B refuses the pinned request naming the state.
            await admin_a.SetVersionState(admin_pb2.SetVersionStateRequest(
                model=MODEL, version="v2", state=lifecycle_pb2.VERSION_STATE_RETIRED, operator="alice",
                reason="no callers left"), metadata=ADMIN, timeout=10)
            await wait_until(lambda: _is(admin_b, "v2", ("VERSION_STATE_RETIRED", 0)), PROPAGATION_S,
                             "router B to follow the retirement")
            with pytest.raises(grpc.aio.AioRpcError) as retired:
                await router_b.Complete(complete(f"{MODEL}@v2", "Pinned."), metadata=caller, timeout=60)
            assert retired.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert f"{MODEL}@v2 is RETIRED" in retired.value.details()
            record = (await admin_b.GetModel(admin_pb2.GetModelRequest(model=MODEL), metadata=ADMIN,
                                             timeout=10)).model
            history = next(v for v in record.versions if v.version == "v2").history
            assert [(lifecycle_pb2.VersionState.Name(c.to_state), c.operator, c.reason) for c in history] == [
                ("VERSION_STATE_PENDING_APPROVAL", "admin", "registered"), ("VERSION_STATE_ACTIVE", "bob", "approved"),
                ("VERSION_STATE_DEPRECATED", "alice", "superseded"),
                ("VERSION_STATE_RETIRED", "alice", "no callers left")]

            # A canary on a dead replica, failing on both routers at once: rolled back once, audited once.
            await admin_a.RegisterModelVersion(admin_pb2.RegisterModelVersionRequest(
                model=MODEL, version="canary", replicas=[admin_pb2.Replica(address=f"127.0.0.1:{free_port()}")],
                canary_policy=admin_pb2.CanaryPolicy(max_error_permille=50, min_requests=3)),
                metadata=ADMIN, timeout=10)
            await admin_a.SetTrafficSplit(admin_pb2.SetTrafficSplitRequest(model=MODEL, weights=[
                admin_pb2.VersionWeight(version=stable, weight_permille=100),
                admin_pb2.VersionWeight(version="canary", weight_permille=900)]), metadata=ADMIN, timeout=10)
            await wait_until(lambda: _is(admin_b, "canary", ("VERSION_STATE_ACTIVE", 900)), PROPAGATION_S,
                             "router B to follow the canary split")
            answers = await asyncio.gather(*[
                router.Complete(complete(MODEL, f"Canary {i}."), metadata=caller, timeout=60)
                for i in range(12) for router in (router_a, router_b)])
            assert {r.model_version for r in answers} == {stable}  # every caller answered by the stable version
            for admin in (admin_a, admin_b):
                await wait_until(lambda admin=admin: _is(admin, "canary", ("VERSION_STATE_PENDING_APPROVAL", 0)),
                                 PROPAGATION_S, "both routers to see the canary rolled back")
            audit = await admin_b.ListAuditEvents(admin_pb2.ListAuditEventsRequest(action="model.rollback"),
                                                  metadata=ADMIN, timeout=10)
            [event] = audit.events
            assert event.actor == "router.canary" and "canary canary over" in event.details["reason"]
    finally:
        stop(processes)


async def _is(admin: admin_grpc.AdminServiceStub, version: str, wanted: tuple[str, int]) -> bool:
    return await state_of(admin, version) == wanted
