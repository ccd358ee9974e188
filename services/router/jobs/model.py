"""Plain data of batch jobs: a job, its items and their outcomes."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from enum import IntEnum

from services.common.generation import FinishReason
from services.common.usage import Usage
from services.router.types import Message, Money, Principal, Sampling


class JobState(IntEnum):
    """Mirrors autoglm.router.v1.JobState."""

    UNSPECIFIED = 0
    QUEUED = 1
    RUNNING = 2
    PAUSED = 3
    SUCCEEDED = 4
    FAILED = 5
    CANCELLED = 6

    @property
    def finished(self) -> bool:
        return self in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED)


class ItemState(IntEnum):
    PENDING = 0
    RUNNING = 1
    SUCCEEDED = 2
    FAILED = 3
    CANCELLED = 4


MAX_ITEMS = 10_000
MAX_CUSTOM_ID = 128


@dataclass(frozen=True)
class ItemSpec:
    custom_id: str
    prompt: str = ""
    messages: tuple[Message, ...] = ()
    sampling: Sampling = field(default_factory=Sampling)


@dataclass(frozen=True)
class NewJob:
    model: str
    items: tuple[ItemSpec, ...]
    deadline: datetime | None = None
    tags: dict[str, str] = field(default_factory=dict)
    idempotency_key: str = ""


@dataclass(frozen=True)
class ItemResult:
    custom_id: str
    state: ItemState
    text: str = ""
    finish_reason: FinishReason = FinishReason.UNSPECIFIED
    usage: Usage = field(default_factory=Usage)
    cost_micros: int = 0
    error_code: str = ""
    error_message: str = ""


@dataclass(frozen=True)
class Job:
    job_id: str
    principal: Principal
    model: str
    state: JobState
    create_time: datetime
    deadline: datetime | None
    end_time: datetime | None
    tags: dict[str, str]
    total_items: int
    completed_items: int = 0
    failed_items: int = 0
    usage: Usage = field(default_factory=Usage)
    cost: Money = field(default_factory=Money)
    results: tuple[ItemResult, ...] = ()


@dataclass(frozen=True)
class ClaimedItem:
    """An item the runner is about to run (`taken_over`: its previous claimant's lease had expired)."""

    job_id: str
    index: int
    spec: ItemSpec
    taken_over: bool = False
