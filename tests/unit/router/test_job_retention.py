"""Finished batch jobs are deleted with their items once past their retention; others stay."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

from services.router.jobs.model import ItemSpec, JobState, NewJob
from services.router.jobs.store import JobStore
from services.router.types import Principal, Sampling

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def test_purge_deletes_only_finished_jobs_that_ended_before_the_cutoff(tmp_path: Path) -> None:
    store = JobStore(tmp_path / "jobs.db")
    principal = Principal(key_id="k", tenant_id="acme")
    for job_id, key in (("old-done", "nightly"), ("new-done", ""), ("old-running", ""), ("old-cancelled", "")):
        store.create(job_id, principal, NewJob(model="m", items=(ItemSpec("a", "hi", (), Sampling()),),
                                               idempotency_key=key), T0)
    store.set_state("old-done", JobState.SUCCEEDED, end_time=T0 + timedelta(hours=1))
    store.set_state("old-cancelled", JobState.CANCELLED, end_time=T0 + timedelta(hours=2))
    store.set_state("new-done", JobState.FAILED, end_time=T0 + timedelta(days=8))
    store.set_state("old-running", JobState.RUNNING)

    assert store.purge_finished(T0 + timedelta(days=7)) == 2
    assert store.get("old-done") is None and store.get("old-cancelled") is None
    assert store.get("new-done") is not None and store.get("old-running") is not None
    assert store.counts("old-done") == {}  # its items went with it
    # Its idempotency key is free again.
    job, created = store.create("again", principal, NewJob(model="m", items=(ItemSpec("a", "hi", (), Sampling()),),
                                                           idempotency_key="nightly"), T0 + timedelta(days=7))
    assert created and job.job_id == "again"
    assert store.purge_finished(T0 + timedelta(days=7)) == 0
