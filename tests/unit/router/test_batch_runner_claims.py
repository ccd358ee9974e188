"""Two batch runners on one job store file (two routers sharing it), with a scripted `execute`: a runner
never takes over an item on a live lease; one whose lease ran out loses the item to the other and, told so
at its next renewal, stops it without writing anything; a job cancelled through one router stops the
item running on the other at that router's next renewal."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from services.common.errors import DomainError, Unavailable
from services.common.generation import FinishReason
from services.common.usage import AlertLevel, Usage
from services.router.jobs.model import ItemSpec, ItemState, JobState, NewJob
from services.router.jobs.runner import BatchRunner, RunnerSettings
from services.router.jobs.store import JobStore
from services.router.types import (
    GenerationRequest,
    Money,
    Principal,
    RequestContext,
    Summary,
)
from tests.waiting import wait_until

T0 = datetime(2026, 1, 1, tzinfo=UTC)
LEASE_S = 15.0


class Scripted:
    """An `execute` whose calls block until the test releases them; records every call by request id."""

    def __init__(self) -> None:
        self.started: list[str] = []
        self.cancelled: list[str] = []
        self.release = asyncio.Event()

    async def __call__(self, ctx: RequestContext, request: GenerationRequest) -> tuple[str, Summary]:
        self.started.append(ctx.request_id)
        try:
            await self.release.wait()
        except asyncio.CancelledError:
            self.cancelled.append(ctx.request_id)
            raise
        return f"answer to {request.prompt}", Summary(FinishReason.STOP, Usage(3, 2), Money("USD", 7), "m", "v1",
                                                      "", 1)


class Router:
    def __init__(self, path: Path, owner: str, now: datetime) -> None:
        self.store = JobStore(path, owner=owner)
        self.now = now
        self.execute = Scripted()

        async def level(principal: Principal, tags: dict[str, str]) -> AlertLevel:
            return AlertLevel.NONE

        def status_name(error: DomainError) -> str:
            return error.reason

        self.runner = BatchRunner(self.store, self.execute, level, status_name,
                                  RunnerSettings(concurrency=1, lease_s=LEASE_S), wallclock=lambda: self.now)


@pytest.fixture
def routers(tmp_path: Path) -> Iterator[tuple[Router, Router]]:
    a, b = Router(tmp_path / "jobs.db", "router-a", T0), Router(tmp_path / "jobs.db", "router-b", T0)
    yield a, b
    a.store.close()
    b.store.close()


def submit(router: Router, n: int) -> str:
    items = tuple(ItemSpec(f"q{i}", f"prompt {i}") for i in range(n))
    router.store.create("job_1", Principal("acme", "key"), NewJob("m", items), T0)
    return "job_1"


async def test_an_item_on_a_live_lease_is_left_alone_and_a_lost_one_stops_without_a_result(
        routers: tuple[Router, Router]) -> None:
    a, b = routers
    job = submit(a, 1)
    await a.runner.tick()
    await wait_until(lambda: a.execute.started == ["job_1-0"], 5, "A to start the item")
    b.now = T0 + timedelta(seconds=LEASE_S - 1)
    await b.runner.tick()
    assert b.execute.started == []  # A's lease is live

    b.now = T0 + timedelta(seconds=LEASE_S)  # A stalled past its lease: B takes the item over
    await b.runner.tick()
    await wait_until(lambda: b.execute.started == ["job_1-0"], 5, "B to take the item over")
    a.now = b.now
    await a.runner.renew()  # A learns it lost the item
    await wait_until(lambda: a.runner.running_items(job) == 0, 5, "A to stop the item it lost")
    assert a.execute.cancelled == ["job_1-0"]
    assert a.store.counts(job) == {ItemState.RUNNING: 1}  # A wrote nothing: the item is B's

    b.execute.release.set()
    await wait_until(lambda: b.runner.running_items(job) == 0, 5, "B to finish the item")
    done = b.store.get(job)
    assert done is not None and [r.text for r in done.results] == ["answer to prompt 0"]
    assert done.usage == Usage(3, 2) and done.cost.micros == 7


async def test_a_job_cancelled_through_one_router_stops_the_item_running_on_the_other(
        routers: tuple[Router, Router]) -> None:
    a, b = routers
    job = submit(a, 3)
    await a.runner.tick()
    await wait_until(lambda: a.execute.started == ["job_1-0"], 5, "A to start an item")
    await b.runner.cancel(job)  # B runs none of the job's items
    assert b.store.counts(job) == {ItemState.CANCELLED: 2, ItemState.RUNNING: 1}  # A's claim is live

    await a.runner.renew()
    await wait_until(lambda: a.runner.running_items(job) == 0, 5, "A to stop its item")
    cancelled = a.store.get(job)
    assert cancelled is not None and cancelled.state == JobState.CANCELLED
    assert [(r.custom_id, r.error_code) for r in cancelled.results] == [
        ("q0", "CANCELLED"), ("q1", "CANCELLED"), ("q2", "CANCELLED")]
    assert a.execute.cancelled == ["job_1-0"]


class UnreachableRenewals(JobStore):
    """The real store, except that renewals fail while `failing` (the database is away)."""

    failing = False

    def renew(self, until: datetime) -> dict[tuple[str, int], JobState]:
        if self.failing:
            raise Unavailable("the router's database cannot be reached; try again shortly")
        return super().renew(until)


def lease_us(store: JobStore) -> int:
    row = store._store.read(lambda tx: tx.one("SELECT lease_us FROM items WHERE job_id = 'job_1' AND idx = 0"))
    assert row is not None
    return int(row["lease_us"])


async def test_a_router_that_cannot_renew_for_a_whole_lease_stops_its_items(tmp_path: Path) -> None:
    store = UnreachableRenewals(tmp_path / "jobs.db", owner="router-a")
    execute = Scripted()

    async def level(principal: Principal, tags: dict[str, str]) -> AlertLevel:
        return AlertLevel.NONE

    lease_s = 0.6  # renewals every 0.2 s
    runner = BatchRunner(store, execute, level, lambda error: error.reason,
                         RunnerSettings(concurrency=1, poll_s=0.05, lease_s=lease_s, shutdown_grace_s=0.1))
    store.create("job_1", Principal("acme", "key"), NewJob("m", (ItemSpec("q0", "prompt 0"),)), T0)
    worker = asyncio.create_task(runner.run_forever())
    try:
        await wait_until(lambda: execute.started == ["job_1-0"], 5, "the item to start")
        first = lease_us(store)
        # Renewals succeed: the lease moves on twice, and the item keeps running past its first lease.
        await wait_until(lambda: lease_us(store) > first, 10 * lease_s, "a renewal")
        second = lease_us(store)
        await wait_until(lambda: lease_us(store) > second, 10 * lease_s, "another renewal")
        assert execute.cancelled == [] and runner.running_items("job_1") == 1
        store.failing = True
        await wait_until(lambda: execute.cancelled == ["job_1-0"], 10 * lease_s,
                         "the item to stop once its lease ran out unrenewed")
        assert store.counts("job_1") == {ItemState.RUNNING: 1}  # nothing written: another router may run it
    finally:
        await runner.close()
        worker.cancel()
        await asyncio.gather(worker, return_exceptions=True)
        store.close()
