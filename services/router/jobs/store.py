"""Batch jobs and their items in the router store (SQLite or PostgreSQL, services/router/store): they
survive a restart.

An item is PENDING, RUNNING (claimed by one router's runner), or finished (SUCCEEDED / FAILED /
CANCELLED). Several routers may share the store, so a claim is a lease on the item row: `claim` moves
items to RUNNING with `claimed_by` = this store's `owner` (a router instance id, fresh at each start) and
`lease_us` = the lease's expiry, in one transaction (on PostgreSQL the rows are taken `FOR UPDATE SKIP
LOCKED`, so two routers claiming at once get disjoint items; SQLite's write lock serialises the claims).
The runner renews its leases (`renew`) while its items run; an item whose lease expired (its router died
or lost the database) is claimable again, by any router, and runs again under the same request id, so
billing (idempotent by event id) still counts it once; a router restarted on the same data dir releases
its previous life's claims at once (`take_over_from_previous_life`). A result is committed only by the
lease's holder (`finish_item`, `requeue_item` check `claimed_by`), so an item has exactly one result even
when a router that lost its lease finishes late. Leases are compared with the routers' wall clocks: keep them in sync
(NTP) to well within the lease.

Retention: `purge_finished` deletes finished jobs (SUCCEEDED / FAILED / CANCELLED) that ended before a
cutoff, with their items and results; the router runs it periodically with `job_retention_s`. A purged
job is NOT_FOUND, and its idempotency key may be used again.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import asdict
from datetime import datetime
from pathlib import Path
from typing import Any

from services.common.generation import FinishReason
from services.common.usage import Usage
from services.router.jobs.model import ClaimedItem, ItemResult, ItemSpec, ItemState, Job, JobState, NewJob
from services.router.store import Row, Store, Tx, open_store
from services.router.store.migrations import JOBS
from services.router.store.values import dt, principal_from_json, principal_json, us
from services.router.types import Message, Money, Principal, Role, Sampling

ACTIVE = (int(JobState.QUEUED), int(JobState.RUNNING), int(JobState.PAUSED))


def _spec_json(spec: ItemSpec) -> str:
    sampling = asdict(spec.sampling)
    return json.dumps({"prompt": spec.prompt, "messages": [[int(m.role), m.content] for m in spec.messages],
                       "sampling": sampling})


def _spec(custom_id: str, text: str) -> ItemSpec:
    data = json.loads(text)
    sampling: dict[str, Any] = data["sampling"]
    sampling["stop"] = tuple(sampling["stop"])
    return ItemSpec(custom_id, data["prompt"], tuple(Message(Role(r), c) for r, c in data["messages"]),
                    Sampling(**sampling))


class JobStore:
    def __init__(self, store: Store | Path, owner: str = "") -> None:
        self._store = open_store(f"sqlite:///{store}") if isinstance(store, Path) else store
        self._store.migrate("jobs", JOBS)
        # The claimant id of this router instance: fresh at each start, so a restarted router never
        # mistakes the leases of its previous life for live ones.
        self.owner = owner or f"router-{uuid.uuid4().hex[:16]}"

    def close(self) -> None:
        self._store.close()

    def create(self, job_id: str, principal: Principal, new: NewJob, now: datetime) -> tuple[Job, bool]:
        """Store a new job; with an idempotency key already used by the tenant, return that job instead."""
        def unit(tx: Tx) -> tuple[Job, bool]:
            if new.idempotency_key:
                row = tx.one("SELECT job_id FROM jobs WHERE tenant_id = ? AND idempotency_key = ?",
                             (principal.tenant_id, new.idempotency_key))
                if row is not None:
                    existing = _get(tx, row["job_id"], with_results=False)
                    assert existing is not None
                    return existing, False
            tx.execute(
                "INSERT INTO jobs (job_id, tenant_id, principal, model, state, create_us, deadline_us, end_us, tags,"
                " idempotency_key, total) VALUES (?, ?, ?, ?, ?, ?, ?, NULL, ?, ?, ?)",
                (job_id, principal.tenant_id, principal_json(principal), new.model, int(JobState.QUEUED),
                 us(now), us(new.deadline), json.dumps(new.tags), new.idempotency_key, len(new.items)),
            )
            tx.executemany(
                "INSERT INTO items (job_id, idx, custom_id, spec) VALUES (?, ?, ?, ?)",
                [(job_id, i, item.custom_id, _spec_json(item)) for i, item in enumerate(new.items)],
            )
            created = _get(tx, job_id, with_results=False)
            assert created is not None
            return created, True

        return self._store.write(unit)

    def get(self, job_id: str, with_results: bool = True) -> Job | None:
        return self._store.read(lambda tx: _get(tx, job_id, with_results))

    def page(self, tenant_id: str, state: JobState, offset: int, limit: int) -> list[Job]:
        query = "SELECT job_id FROM jobs WHERE tenant_id = ?"
        args: list[object] = [tenant_id]
        if state != JobState.UNSPECIFIED:
            query += " AND state = ?"
            args.append(int(state))
        query += " ORDER BY create_us DESC, job_id DESC LIMIT ? OFFSET ?"
        return self._store.read(lambda tx: _jobs(tx, tx.all(query, (*args, limit, offset))))

    def active(self) -> list[Job]:
        """Jobs that still have work, earliest deadline first (no deadline last), then oldest first."""
        return self._store.read(lambda tx: _jobs(tx, tx.all(
            "SELECT job_id FROM jobs WHERE state IN (?, ?, ?)"
            " ORDER BY deadline_us IS NULL, deadline_us, create_us, job_id", ACTIVE)))

    def set_state(self, job_id: str, state: JobState, end_time: datetime | None = None) -> bool:
        """Move an unfinished job to `state`; a finished job never changes again. True when it moved."""
        return self._store.write(lambda tx: tx.execute(
            "UPDATE jobs SET state = ?, end_us = ? WHERE job_id = ? AND state IN (?, ?, ?)",
            (int(state), us(end_time), job_id, *ACTIVE))) > 0

    def claim(self, job_id: str, limit: int, now: datetime, until: datetime) -> list[ClaimedItem]:
        """Claim up to `limit` of the job's items for this router until `until`: pending ones, and running
        ones whose lease expired by `now` (their router is gone), lowest index first."""
        lock = " FOR UPDATE SKIP LOCKED" if self._store.dialect == "postgres" else ""

        def unit(tx: Tx) -> list[Row]:
            rows = tx.all(
                "SELECT idx, custom_id, spec, state FROM items WHERE job_id = ?"
                " AND (state = ? OR (state = ? AND lease_us <= ?)) ORDER BY idx LIMIT ?" + lock,
                (job_id, int(ItemState.PENDING), int(ItemState.RUNNING), us(now), limit))
            if rows:
                tx.executemany(
                    "UPDATE items SET state = ?, claimed_by = ?, lease_us = ?, attempts = attempts + 1"
                    " WHERE job_id = ? AND idx = ?",
                    [(int(ItemState.RUNNING), self.owner, us(until), job_id, row["idx"]) for row in rows])
            return rows

        rows = self._store.write(unit)
        return [ClaimedItem(job_id, row["idx"], _spec(row["custom_id"], row["spec"]),
                            taken_over=row["state"] == int(ItemState.RUNNING)) for row in rows]

    def claimable(self, job_id: str, now: datetime) -> int:
        """How many of the job's items `claim` would take now (pending, or running on an expired lease)."""
        row = self._store.read(lambda tx: tx.one(
            "SELECT COUNT(*) AS n FROM items WHERE job_id = ? AND (state = ? OR (state = ? AND lease_us <= ?))",
            (job_id, int(ItemState.PENDING), int(ItemState.RUNNING), us(now))))
        return int(row["n"]) if row is not None else 0

    def renew(self, until: datetime) -> dict[tuple[str, int], JobState]:
        """Extend the leases this router still holds to `until`; returns each (job_id, index) it holds with
        its job's state. An item missing from the answer is no longer this router's (taken over after its
        lease expired, or closed); one whose job ended (cancelled, deadline passed through another router)
        should stop."""
        def unit(tx: Tx) -> dict[tuple[str, int], JobState]:
            tx.execute("UPDATE items SET lease_us = ? WHERE claimed_by = ? AND state = ?",
                       (us(until), self.owner, int(ItemState.RUNNING)))
            return {(row["job_id"], int(row["idx"])): JobState(row["state"]) for row in tx.all(
                "SELECT items.job_id, items.idx, jobs.state FROM items JOIN jobs ON jobs.job_id = items.job_id"
                " WHERE items.claimed_by = ? AND items.state = ?", (self.owner, int(ItemState.RUNNING)))}

        return self._store.write(unit)

    def finish_item(self, job_id: str, index: int, result: ItemResult, currency: str = "") -> bool:
        """Commit the item's result, once: only while this router holds its claim. False when it does not
        (another router took it over, or it was closed): the result is dropped."""
        return self._store.write(lambda tx: tx.execute(
            "UPDATE items SET state = ?, text = ?, finish = ?, prompt_tokens = ?, completion_tokens = ?,"
            " cost_micros = ?, currency = ?, error_code = ?, error_message = ?, lease_us = 0"
            " WHERE job_id = ? AND idx = ? AND state = ? AND claimed_by = ?",
            (int(result.state), result.text, int(result.finish_reason), result.usage.prompt_tokens,
             result.usage.completion_tokens, result.cost_micros, currency, result.error_code,
             result.error_message, job_id, index, int(ItemState.RUNNING), self.owner),
        )) > 0

    def requeue_item(self, job_id: str, index: int) -> None:
        """Give a claimed item back (PENDING, unclaimed), if this router still holds it."""
        self._store.write(lambda tx: tx.execute(
            "UPDATE items SET state = ?, claimed_by = '', lease_us = 0"
            " WHERE job_id = ? AND idx = ? AND state = ? AND claimed_by = ?",
            (int(ItemState.PENDING), job_id, index, int(ItemState.RUNNING), self.owner)))

    def release(self, owner: str) -> int:
        """Put the items `owner` still claims back to PENDING (the owner is known dead: a previous life of
        this router). Returns how many."""
        return self._store.write(lambda tx: tx.execute(
            "UPDATE items SET state = ?, claimed_by = '', lease_us = 0 WHERE claimed_by = ? AND state = ?",
            (int(ItemState.PENDING), owner, int(ItemState.RUNNING))))

    def take_over_from_previous_life(self, marker: Path) -> int:
        """At start: release the claims of the instance that last ran with this data dir (its id is in
        `marker`), which died with them, so a restarted router re-runs its items at once instead of after
        their lease; then record this instance's id there. Other routers' claims are left alone."""
        previous = marker.read_text().strip() if marker.exists() else ""
        released = self.release(previous) if previous and previous != self.owner else 0
        staged = marker.with_name(marker.name + ".tmp")
        staged.write_text(self.owner + "\n")
        staged.replace(marker)
        return released

    def close_running(self, job_id: str, state: ItemState, error_code: str, message: str, now: datetime) -> int:
        """Close the job's running items whose lease expired by `now` (their router is gone)."""
        return self._store.write(lambda tx: tx.execute(
            "UPDATE items SET state = ?, error_code = ?, error_message = ?, lease_us = 0"
            " WHERE job_id = ? AND state = ? AND lease_us <= ?",
            (int(state), error_code, message, job_id, int(ItemState.RUNNING), us(now))))

    def close_pending(self, job_id: str, state: ItemState, error_code: str, message: str) -> int:
        return self._store.write(lambda tx: tx.execute(
            "UPDATE items SET state = ?, error_code = ?, error_message = ? WHERE job_id = ? AND state = ?",
            (int(state), error_code, message, job_id, int(ItemState.PENDING))))

    def counts(self, job_id: str) -> dict[ItemState, int]:
        rows = self._store.read(lambda tx: tx.all(
            "SELECT state, COUNT(*) AS n FROM items WHERE job_id = ? GROUP BY state", (job_id,)))
        return {ItemState(row["state"]): row["n"] for row in rows}

    def purge_finished(self, ended_before: datetime) -> int:
        """Delete finished jobs that ended before `ended_before`; returns how many."""
        finished = (int(JobState.SUCCEEDED), int(JobState.FAILED), int(JobState.CANCELLED))

        def unit(tx: Tx) -> int:
            ids = [(row["job_id"],) for row in tx.all(
                "SELECT job_id FROM jobs WHERE state IN (?, ?, ?) AND end_us IS NOT NULL AND end_us < ?",
                (*finished, us(ended_before)))]
            if ids:
                tx.executemany("DELETE FROM items WHERE job_id = ?", ids)
                tx.executemany("DELETE FROM jobs WHERE job_id = ?", ids)
            return len(ids)

        return self._store.write(unit)


def _jobs(tx: Tx, rows: list[Row]) -> list[Job]:
    jobs = [_get(tx, row["job_id"], with_results=False) for row in rows]
    return [job for job in jobs if job is not None]


def _get(tx: Tx, job_id: str, with_results: bool) -> Job | None:
    row = tx.one("SELECT * FROM jobs WHERE job_id = ?", (job_id,))
    if row is None:
        return None
    totals = tx.all(
        "SELECT state, COUNT(*) AS n, SUM(prompt_tokens) AS p, SUM(completion_tokens) AS c,"
        " SUM(cost_micros) AS m, MAX(currency) AS cur FROM items WHERE job_id = ? GROUP BY state", (job_id,))
    by_state = {ItemState(t["state"]): t for t in totals}
    prompt = sum(int(t["p"] or 0) for t in totals)
    completion = sum(int(t["c"] or 0) for t in totals)
    currency = max((t["cur"] or "" for t in totals), default="") or "USD"
    results: tuple[ItemResult, ...] = ()
    if with_results:
        results = tuple(_result(r) for r in tx.all(
            "SELECT * FROM items WHERE job_id = ? AND state >= ? ORDER BY idx", (job_id, int(ItemState.SUCCEEDED))))
    return Job(
        job_id=row["job_id"], principal=principal_from_json(row["principal"]), model=row["model"],
        state=JobState(row["state"]), create_time=dt(row["create_us"]),  # type: ignore[arg-type]
        deadline=dt(row["deadline_us"]), end_time=dt(row["end_us"]), tags=json.loads(row["tags"]),
        total_items=row["total"],
        completed_items=by_state[ItemState.SUCCEEDED]["n"] if ItemState.SUCCEEDED in by_state else 0,
        failed_items=by_state[ItemState.FAILED]["n"] if ItemState.FAILED in by_state else 0,
        usage=Usage(prompt, completion), cost=Money(currency, sum(int(t["m"] or 0) for t in totals)),
        results=results,
    )


def _result(row: Any) -> ItemResult:
    return ItemResult(
        custom_id=row["custom_id"], state=ItemState(row["state"]), text=row["text"],
        finish_reason=FinishReason(row["finish"]), usage=Usage(row["prompt_tokens"], row["completion_tokens"]),
        cost_micros=row["cost_micros"], error_code=row["error_code"], error_message=row["error_message"],
    )
