"""The router store on both backends (SQLite file, real PostgreSQL): the same domain tests run against
each, and two stores in two event loops on one database stay coherent (a key created through one
authenticates through the other at once; revoked through the other, it is refused within 1 s)."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TypeVar

import psycopg
import pytest

from services.common.errors import Unauthenticated, Unavailable
from services.common.usage import Usage
from services.router.auth.api_keys import NewApiKey, new_secret
from services.router.auth.authenticator import Authenticator
from services.router.auth.key_store import KeyStore
from services.router.config import RouterConfig
from services.router.contexts import ContextStore
from services.router.jobs.model import ItemResult, ItemSpec, ItemState, JobState, NewJob
from services.router.jobs.store import JobStore
from services.router.policy import Policy, PolicyStore
from services.router.registry import ModelEntry, Registry
from services.router.store import Store, open_store
from services.router.types import Message, Principal, Role
from tests.integration.billing.conftest import PgServer, postgres  # noqa: F401 - the session's PostgreSQL
from tests.waiting import wait_until

T = TypeVar("T")
PROPAGATION_S = 1.0  # a change made through one router reaches every other within this


@pytest.fixture(params=["sqlite", "postgres"])
def database(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh, empty database of each kind."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'router.db'}"
    server: PgServer = request.getfixturevalue("postgres")
    return server.create_database()


@pytest.fixture
def stores() -> Iterator[list[Store]]:
    opened: list[Store] = []
    yield opened
    for store in opened:
        store.close()


def test_keys_policies_models_contexts_and_jobs_are_kept(database: str, stores: list[Store]) -> None:
    store = open_store(database)
    stores.append(store)
    keys = KeyStore(store, b"pepper")
    record, secret = keys.create(NewApiKey(tenant_id="acme", name="ci", allowed_models=("m",), tokens_per_minute=9))
    assert keys.find_by_secret(secret) == record and keys.find_by_secret(secret + "x") is None
    assert keys.revoke(record.key_id).revoke_time is not None
    assert keys.revoke(record.key_id).revoke_time == keys.get(record.key_id).revoke_time  # idempotent
    assert keys.list("acme") == [] and [k.key_id for k in keys.list("acme", include_revoked=True)] == [record.key_id]

    policies = PolicyStore(store)
    policies.set("acme", Policy(blocked_terms=("secret",), max_tokens_cap=64))
    registry = Registry(store)
    registry.register("m", "v1", ("127.0.0.1:1",), context_window=2048)
    registry.register("m", "v2", ("127.0.0.1:2",))
    registry.set_split("m", {"v1": 900, "v2": 100})
    registry.audit("ops", "key.create", "key/k", {"n": 1})
    page, token = registry.audit_page("", 2, "")
    assert [e.action for e in page] == ["key.create", "model.split"] and token
    assert [e.action for e in registry.audit_page("", 10, token)[0]] == ["model.register", "model.register"]
    assert [e.action for e in registry.audit_events("model.split")] == ["model.split"]

    contexts = ContextStore(store, max_messages=4)
    for turn in range(3):
        contexts.append("acme", "c1", (Message(Role.USER, f"q{turn}"), Message(Role.ASSISTANT, f"a{turn}")))
    assert [m.content for m in contexts.history("acme", "c1")] == ["q1", "a1", "q2", "a2"]
    assert contexts.history("other", "c1") == ()

    jobs = JobStore(store)
    principal = Principal("acme", record.key_id)
    new = NewJob("m", (ItemSpec("a", "one"), ItemSpec("b", "two")), idempotency_key="k1")
    job, created = jobs.create("job_1", principal, new, datetime.now(UTC))
    assert created and jobs.create("job_2", principal, new, datetime.now(UTC)) == (job, False)
    claimed = jobs.claim("job_1", 5, datetime.now(UTC), datetime.now(UTC) + timedelta(seconds=30))
    assert [c.spec.custom_id for c in claimed] == ["a", "b"]
    jobs.finish_item("job_1", 0, ItemResult("a", ItemState.SUCCEEDED, "x", usage=Usage(3, 4), cost_micros=7), "USD")
    jobs.requeue_item("job_1", 1)
    assert jobs.close_pending("job_1", ItemState.CANCELLED, "CANCELLED", "stop") == 1
    assert jobs.set_state("job_1", JobState.CANCELLED, datetime.now(UTC))
    done = jobs.get("job_1")
    assert done is not None and done.completed_items == 1 and done.usage == Usage(3, 4) and done.cost.micros == 7
    assert [r.custom_id for r in done.results] == ["a", "b"]
    assert jobs.purge_finished(datetime.now(UTC) + timedelta(seconds=1)) == 1 and jobs.get("job_1") is None

    # A second store on the same database (another router, or this one restarted) finds all of it.
    again = open_store(database)
    stores.append(again)
    assert KeyStore(again, b"pepper").find_by_secret(secret).revoke_time is not None  # type: ignore[union-attr]
    assert PolicyStore(again).for_tenant("acme").max_tokens_cap == 64
    assert Registry(again).get("m").version("v2").weight_permille == 100
    assert len(ContextStore(again).history("acme", "c1")) == 4


def test_migrations_run_once_and_adopt_a_router_data_dir_from_before(tmp_path: Path, stores: list[Store]) -> None:
    path = tmp_path / "keys.db"
    with sqlite3.connect(path) as legacy:  # the schema routers wrote before the store had migrations
        legacy.executescript("""
            CREATE TABLE api_keys (key_id TEXT PRIMARY KEY, secret_hash TEXT NOT NULL UNIQUE, prefix TEXT NOT NULL,
                tenant_id TEXT NOT NULL, name TEXT NOT NULL, allowed_models TEXT NOT NULL,
                requests_per_minute INTEGER NOT NULL, tokens_per_minute INTEGER NOT NULL,
                traffic_class INTEGER NOT NULL, create_time TEXT NOT NULL, revoke_time TEXT, expire_time TEXT);
        """)
    first = KeyStore(path, b"pepper")
    record, secret = first.create(NewApiKey(tenant_id="acme"))
    first.close()
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE api_keys SET version = 0")  # as a row written before versions existed
    store = open_store(f"sqlite:///{path}")
    stores.append(store)
    found = KeyStore(store, b"pepper").find_by_secret(secret)
    assert found is not None and found.key_id == record.key_id
    applied = store.read(lambda tx: tx.all("SELECT domain, version FROM router_migrations ORDER BY domain, version"))
    assert [(r["domain"], r["version"]) for r in applied] == [("changes", 1), ("keys", 1), ("keys", 2), ("keys", 3)]


def test_a_router_with_another_key_pepper_refuses_to_start(database: str, stores: list[Store]) -> None:
    store = open_store(database)
    stores.append(store)
    KeyStore(store, b"pepper").create(NewApiKey(tenant_id="acme"))
    with pytest.raises(RuntimeError, match="same pepper"):
        KeyStore(store, b"another pepper")


class CountingStore:
    """A real store that counts the units domain code runs on it."""

    def __init__(self, inner: Store) -> None:
        self.inner = inner
        self.units = 0

    def __getattr__(self, name: str) -> object:
        return getattr(self.inner, name)

    def read(self, fn: Callable[..., T]) -> T:
        self.units += 1
        return self.inner.read(fn)

    def write(self, fn: Callable[..., T]) -> T:
        self.units += 1
        return self.inner.write(fn)


def test_known_keys_policies_and_routing_are_answered_from_memory(database: str, stores: list[Store]) -> None:
    store = CountingStore(open_store(database))
    stores.append(store.inner)
    keys, policies, registry = KeyStore(store, b"pepper"), PolicyStore(store), Registry(store)  # type: ignore[arg-type]
    _, secret = keys.create(NewApiKey(tenant_id="acme"))
    policies.set("acme", Policy(max_tokens_cap=5))
    registry.register("m", "v1", ("127.0.0.1:1",))
    auth = Authenticator(keys, "admin")
    before = store.units
    for _ in range(100):
        assert auth.authenticate(f"Bearer {secret}").tenant_id == "acme"
        assert policies.for_tenant("acme").max_tokens_cap == 5
        assert registry.pick_version("m").version == "v1" and registry.get("m").name == "m"
    assert store.units == before


class LoopThread:
    """Another router: its own event loop on its own thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def call(self, fn: Callable[[], T]) -> T:
        """Run `fn` on this loop (as the router's request path would) and return what it returns."""
        async def run() -> T:
            return fn()

        future: Future[T] = asyncio.run_coroutine_threadsafe(run(), self.loop)
        return future.result(timeout=30)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=30)
        self.loop.close()


class Router:
    """The cached domains of one router, over its own store."""

    def __init__(self, database: str) -> None:
        self.store = open_store(database)
        self.keys = KeyStore(self.store, b"pepper")
        self.auth = Authenticator(self.keys, "admin")
        self.policies = PolicyStore(self.store)
        self.registry = Registry(self.store)
        self.changed: list[ModelEntry] = []
        self.registry.on_change.append(self.changed.append)

    def accepts(self, secret: str) -> bool:
        try:
            self.auth.authenticate(f"Bearer {secret}")
            return True
        except Unauthenticated:
            return False


async def test_a_change_through_one_router_reaches_another_within_a_second(database: str) -> None:
    other = LoopThread()
    a = Router(database)  # on this test's event loop
    b = other.call(lambda: Router(database))
    try:
        record, secret = a.keys.create(NewApiKey(tenant_id="acme"))
        assert other.call(lambda: b.accepts(secret))  # at once: B has never seen the key
        assert a.accepts(secret)
        other.call(lambda: b.keys.revoke(record.key_id))
        assert not other.call(lambda: b.accepts(secret))
        await wait_until(lambda: not a.accepts(secret), PROPAGATION_S, "A to refuse the key revoked through B")

        other.call(lambda: b.policies.set("acme", Policy(max_tokens_cap=7)))
        await wait_until(lambda: a.policies.for_tenant("acme").max_tokens_cap == 7, PROPAGATION_S,
                         "A to apply the policy set through B")
        a.registry.register("m", "v1", ("127.0.0.1:1",))
        a.registry.register("m", "v2", ("127.0.0.1:2",))
        a.registry.set_split("m", {"v1": 500, "v2": 500})

        def b_routes_by_the_new_split() -> bool:
            return other.call(lambda: "m" in b.registry and b.registry.get("m").version("v2").weight_permille == 500)

        await wait_until(b_routes_by_the_new_split, PROPAGATION_S, "B to route by the split set through A")
        assert other.call(lambda: [m.name for m in b.changed][-1:]) == ["m"]  # B's watchers heard of it
    finally:
        a.store.close()
        other.call(b.store.close)
        other.stop()


async def test_while_postgres_is_unreachable_known_keys_serve_and_a_revocation_after_it_still_arrives(
    postgres: PgServer,  # noqa: F811
) -> None:
    dsn = postgres.create_database()
    name = dsn.split("@/")[1].split("?")[0]
    other = LoopThread()
    a = Router(dsn)
    b = other.call(lambda: Router(dsn))
    known, secret = a.keys.create(NewApiKey(tenant_id="acme"))
    late, late_secret = other.call(lambda: b.keys.create(NewApiKey(tenant_id="acme")))
    assert a.accepts(secret)

    def outage(allowed: bool) -> None:
        with psycopg.connect(postgres.dsn(), autocommit=True) as admin:
            admin.execute(f"ALTER DATABASE {name} ALLOW_CONNECTIONS {str(allowed).lower()}")
            if not allowed:
                admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,))

    try:
        outage(allowed=False)
        await wait_until(lambda: not a.store.available, PROPAGATION_S * 5, "A to notice the database is away")
        assert a.accepts(secret)  # from memory
        assert not a.accepts(new_secret())  # a secret not in memory is refused
        with pytest.raises(Unavailable):
            a.keys.create(NewApiKey(tenant_id="acme"))
        outage(allowed=True)
        await wait_until(lambda: a.store.available, 30, "A to reach the database again")
        other.call(lambda: b.keys.revoke(known.key_id))
        await wait_until(lambda: not a.accepts(secret), PROPAGATION_S, "A to refuse the key revoked after the outage")
        assert a.accepts(late_secret) and late.tenant_id == "acme"
    finally:
        outage(allowed=True)
        a.store.close()
        other.call(b.store.close)
        other.stop()


@pytest.mark.parametrize("fields", [{"database": "mysql://db/autoglm"}, {"database": "keys.db"},
                                    {"store_poll_s": 0}, {"store_poll_s": 5}])
def test_a_database_or_poll_setting_the_router_cannot_use_is_refused_at_start(fields: dict[str, object]) -> None:
    with pytest.raises(ValueError, match=r"database|store_poll_s"):
        RouterConfig(**fields)  # type: ignore[arg-type]
