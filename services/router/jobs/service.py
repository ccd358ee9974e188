"""The public operations on batch jobs: submit (validated, idempotent), get, list and cancel.

A job belongs to the tenant that submitted it: other tenants get NOT_FOUND, as if it did not exist.
Each operation is a coroutine that runs its store transaction on a worker thread, as the runner does:
a caller waiting on the database never stops the event loop.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from datetime import UTC, datetime

from services.common.errors import FailedPrecondition, InvalidInput, NotFound
from services.router.jobs.model import MAX_CUSTOM_ID, MAX_ITEMS, ItemSpec, Job, JobState, NewJob
from services.router.jobs.runner import BatchRunner
from services.router.jobs.store import JobStore
from services.router.types import Principal, Role

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 500
MAX_IDEMPOTENCY_KEY = 128


def validate_items(items: tuple[ItemSpec, ...]) -> tuple[ItemSpec, ...]:
    """Every item has exactly one of prompt and messages; custom ids are unique (an empty one becomes
    `item-<index>`)."""
    if not 1 <= len(items) <= MAX_ITEMS:
        raise InvalidInput(f"a job has 1 to {MAX_ITEMS} items, got {len(items)}", field="items")
    seen: set[str] = set()
    named = []
    for index, item in enumerate(items):
        where = f"items[{index}]"
        if bool(item.prompt) == bool(item.messages):
            raise InvalidInput("set exactly one of prompt and messages", field=f"{where}.prompt")
        for m, message in enumerate(item.messages):
            if message.role == Role.UNSPECIFIED:
                raise InvalidInput("every message needs a role (SYSTEM, USER or ASSISTANT)",
                                   field=f"{where}.messages[{m}].role")
        if item.sampling.max_tokens is not None and item.sampling.max_tokens < 1:
            raise InvalidInput("sampling.max_tokens must be >= 1", field=f"{where}.sampling.max_tokens")
        custom_id = item.custom_id or f"item-{index}"
        if len(custom_id) > MAX_CUSTOM_ID:
            raise InvalidInput(f"custom_id is at most {MAX_CUSTOM_ID} characters", field=f"{where}.custom_id")
        if custom_id in seen:
            raise InvalidInput(f"custom_id {custom_id!r} is used twice in this job", field=f"{where}.custom_id")
        seen.add(custom_id)
        named.append(ItemSpec(custom_id, item.prompt, item.messages, item.sampling))
    return tuple(named)


class Jobs:
    def __init__(
        self,
        store: JobStore,
        runner: BatchRunner,
        check_model: Callable[[Principal, str], None],
        check_tags: Callable[[dict[str, str]], None],
        wallclock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._store = store
        self._runner = runner
        self._check_model = check_model
        self._check_tags = check_tags
        self._wallclock = wallclock

    async def submit(self, principal: Principal, new: NewJob) -> Job:
        if not new.model:
            raise InvalidInput("model is required", field="model")
        self._check_model(principal, new.model)
        self._check_tags(new.tags)
        if len(new.idempotency_key) > MAX_IDEMPOTENCY_KEY:
            raise InvalidInput(f"idempotency_key is at most {MAX_IDEMPOTENCY_KEY} characters",
                               field="idempotency_key")
        now = self._wallclock()
        if new.deadline is not None and new.deadline <= now:
            raise InvalidInput("deadline is in the past", field="deadline")
        items = validate_items(new.items)
        job, created = await asyncio.to_thread(
            self._store.create, f"job_{uuid.uuid4().hex[:24]}", principal,
            NewJob(new.model, items, new.deadline, new.tags, new.idempotency_key), now)
        if created:
            self._runner.wake()
        return job

    async def get(self, principal: Principal, job_id: str, with_results: bool = True) -> Job:
        if not job_id:
            raise InvalidInput("job_id is required", field="job_id")
        job = await asyncio.to_thread(self._store.get, job_id, with_results)
        if job is None or job.principal.tenant_id != principal.tenant_id:
            raise NotFound(f"no job {job_id!r} for this tenant", field="job_id")
        return job

    async def list(self, principal: Principal, state: JobState, page_size: int, page_token: str
                   ) -> tuple[list[Job], str]:
        if page_size < 0:
            raise InvalidInput("page_size must be >= 0", field="page_size")
        size = min(page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        try:
            offset = int(page_token) if page_token else 0
        except ValueError:
            offset = -1
        if offset < 0:
            raise InvalidInput("page_token is not one this service returned", field="page_token")
        jobs = await asyncio.to_thread(self._store.page, principal.tenant_id, state, offset, size + 1)
        more = len(jobs) > size
        return jobs[:size], str(offset + size) if more else ""

    async def cancel(self, principal: Principal, job_id: str) -> Job:
        job = await self.get(principal, job_id, with_results=False)
        if job.state.finished:
            raise FailedPrecondition(f"job {job_id} already ended as {job.state.name}", field="job_id")
        await self._runner.cancel(job_id)
        return await self.get(principal, job_id)
