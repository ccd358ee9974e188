"""Batch-item claims on both store backends (SQLite file, real PostgreSQL), as two routers sharing one
database make them: disjoint claims, even when racing; a live lease is never taken over, an expired one
is; only the claim's holder commits a result, once; a renewal keeps a lease and tells a router which items
it lost."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from services.common.usage import Usage
from services.router.jobs.model import ItemResult, ItemSpec, ItemState, JobState, NewJob
from services.router.jobs.store import JobStore
from services.router.store import Store, open_store
from services.router.store.migrations import JOBS
from services.router.types import Principal
from tests.integration.billing.conftest import PgServer, postgres  # noqa: F401 - the session's PostgreSQL

LEASE = timedelta(seconds=15)
T0 = datetime(2026, 1, 1, tzinfo=UTC)


@pytest.fixture(params=["sqlite", "postgres"])
def database(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'router.db'}"
    server: PgServer = request.getfixturevalue("postgres")
    return server.create_database()


@pytest.fixture
def routers(database: str) -> Iterator[list[JobStore]]:
    """Two routers' job stores, each on its own connection(s) to one database."""
    stores: list[Store] = [open_store(database), open_store(database)]
    yield [JobStore(stores[0], owner="router-a"), JobStore(stores[1], owner="router-b")]
    for store in stores:
        store.close()


def submit(jobs: JobStore, n: int, job_id: str = "job_1") -> str:
    items = tuple(ItemSpec(f"q{i}", f"prompt {i}") for i in range(n))
    jobs.create(job_id, Principal("acme", "key"), NewJob("m", items), T0)
    return job_id


def done(custom_id: str) -> ItemResult:
    return ItemResult(custom_id, ItemState.SUCCEEDED, "answer", usage=Usage(3, 4), cost_micros=7)


def attempts(jobs: JobStore, job_id: str) -> dict[int, int]:
    rows = jobs._store.read(lambda tx: tx.all("SELECT idx, attempts FROM items WHERE job_id = ?", (job_id,)))
    return {int(r["idx"]): int(r["attempts"]) for r in rows}


def test_a_live_lease_is_never_taken_over_and_an_expired_one_is(routers: list[JobStore]) -> None:
    a, b = routers
    job = submit(a, 5)
    assert [c.index for c in a.claim(job, 3, T0, T0 + LEASE)] == [0, 1, 2]
    assert [c.index for c in b.claim(job, 5, T0, T0 + LEASE)] == [3, 4]
    # Every item runs on a live claim: nobody, not even a freshly started router, may take one.
    late = T0 + LEASE - timedelta(seconds=1)
    assert b.claim(job, 5, late, late + LEASE) == [] and b.claimable(job, late) == 0
    assert b.counts(job) == {ItemState.RUNNING: 5}

    # A dies: once its leases ran out, B takes its items over, and A's late results are dropped.
    after = T0 + LEASE
    assert b.claimable(job, after) == 5  # B's own leases ran out too: it would have renewed them
    taken = b.claim(job, 3, after, after + LEASE)
    assert [(c.index, c.taken_over) for c in taken] == [(0, True), (1, True), (2, True)]
    assert not a.finish_item(job, 0, done("q0"), "USD")
    assert b.finish_item(job, 0, done("q0"), "USD")
    assert not b.finish_item(job, 0, done("q0"), "USD")  # committed once
    a.requeue_item(job, 1)  # not A's any more: no effect
    assert b.counts(job) == {ItemState.SUCCEEDED: 1, ItemState.RUNNING: 4}
    assert attempts(b, job) == {0: 2, 1: 2, 2: 2, 3: 1, 4: 1}
    finished = b.get(job)
    assert finished is not None and [r.custom_id for r in finished.results] == ["q0"]
    assert finished.usage == Usage(3, 4) and finished.cost.micros == 7


def test_renewal_keeps_a_lease_and_names_what_a_router_still_holds(routers: list[JobStore]) -> None:
    a, b = routers
    job = submit(a, 3)
    a.claim(job, 2, T0, T0 + LEASE)
    renewed = T0 + timedelta(seconds=10)
    assert a.renew(renewed + LEASE) == {(job, 0): JobState.QUEUED, (job, 1): JobState.QUEUED}
    # Past the first lease but within the renewed one: still A's.
    assert b.claim(job, 3, T0 + LEASE, T0 + 2 * LEASE)[0].index == 2
    assert b.claimable(job, T0 + LEASE) == 0
    # A stalls past its renewed lease: B takes item 0, and A's next renewal says it lost it.
    b.claim(job, 1, renewed + LEASE, renewed + 2 * LEASE)
    assert a.renew(renewed + 2 * LEASE) == {(job, 1): JobState.QUEUED}
    # A job cancelled through B: A's renewal tells A to stop its item.
    assert b.set_state(job, JobState.CANCELLED, renewed)
    assert a.renew(renewed + 2 * LEASE) == {(job, 1): JobState.CANCELLED}


def test_closing_a_job_closes_only_items_on_expired_leases(routers: list[JobStore]) -> None:
    a, b = routers
    job = submit(a, 3)
    a.claim(job, 1, T0, T0 + LEASE)
    b.claim(job, 1, T0 + timedelta(seconds=5), T0 + timedelta(seconds=5) + LEASE)
    assert b.close_pending(job, ItemState.CANCELLED, "CANCELLED", "the job was cancelled") == 1
    # At T0 + LEASE A's lease is out (A is gone); B's is live, B stops its item itself.
    assert b.close_running(job, ItemState.CANCELLED, "CANCELLED", "the job was cancelled", T0 + LEASE) == 1
    assert b.counts(job) == {ItemState.CANCELLED: 2, ItemState.RUNNING: 1}
    assert b.finish_item(job, 1, ItemResult("q1", ItemState.CANCELLED, error_code="CANCELLED"))


def test_routers_claiming_at_once_never_share_an_item(routers: list[JobStore]) -> None:
    a = routers[0]
    job = submit(a, 120)
    claimed: dict[str, list[int]] = {"router-a": [], "router-b": []}
    start, both_claimed = threading.Barrier(2), threading.Barrier(2)

    def worker(jobs: JobStore) -> None:
        start.wait()
        first = True
        while batch := jobs.claim(job, 3, T0, T0 + LEASE):
            claimed[jobs.owner].extend(c.index for c in batch)
            for c in batch:
                assert jobs.finish_item(job, c.index, done(c.spec.custom_id))
            if first:  # neither races through every item before the other has claimed at all
                both_claimed.wait(timeout=30)
                first = False

    threads = [threading.Thread(target=worker, args=(jobs,)) for jobs in routers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not any(thread.is_alive() for thread in threads)
    every = claimed["router-a"] + claimed["router-b"]
    assert sorted(every) == list(range(120))  # each item claimed once, by one router
    assert claimed["router-a"] and claimed["router-b"]
    assert set(attempts(a, job).values()) == {1}
    assert a.counts(job) == {ItemState.SUCCEEDED: 120}


def test_items_left_running_by_a_router_from_before_claims_are_taken_over_after_the_upgrade(database: str) -> None:
    store = open_store(database)
    try:
        store.migrate("jobs", JOBS[:1])  # the schema of routers before claims, mid-job
        store.write(lambda tx: tx.execute(
            "INSERT INTO jobs (job_id, tenant_id, principal, model, state, create_us, tags, idempotency_key, total)"
            " VALUES ('job_1', 'acme', ?, 'm', ?, 0, '{}', '', 2)",
            (json.dumps({"tenant_id": "acme", "key_id": "key", "allowed_models": [], "traffic_class": 0}),
             int(JobState.RUNNING))))
        store.write(lambda tx: tx.executemany(
            "INSERT INTO items (job_id, idx, custom_id, spec, state) VALUES ('job_1', ?, ?, ?, ?)",
            [(i, f"q{i}", json.dumps({"prompt": f"prompt {i}", "messages": [], "sampling": {"stop": []}}), state)
             for i, state in ((0, int(ItemState.RUNNING)), (1, int(ItemState.PENDING)))]))
        jobs = JobStore(store, owner="router-new")  # the upgraded router: migration 2 adds the claim columns
        taken = jobs.claim("job_1", 5, T0, T0 + LEASE)
        assert [(c.index, c.taken_over) for c in taken] == [(0, True), (1, False)]
        applied = store.read(lambda tx: tx.all("SELECT version FROM router_migrations WHERE domain = 'jobs'"))
        assert sorted(int(r["version"]) for r in applied) == [1, 2]
    finally:
        store.close()
