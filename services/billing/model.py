"""Plain dataclasses of the ledger. Times are integer microseconds since the Unix epoch (UTC);
money is integer micro-units of the ledger's currency; nothing here is a float. Prices are the mesh's
shared ones (`services.common.pricing`), which the router quotes with; so are the traffic class
(`services.common.generation`), the usage status and the alert level (`services.common.usage`)."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from services.common.generation import TrafficClass
from services.common.usage import AlertLevel, UsageStatus


class ScopeKind(enum.IntEnum):
    UNSPECIFIED = 0
    TENANT = 1
    API_KEY = 2
    TAG = 3


class PeriodKind(enum.IntEnum):
    UNSPECIFIED = 0
    DAILY = 1
    WEEKLY = 2
    MONTHLY = 3
    ROLLING_DAYS = 4


class Enforcement(enum.IntEnum):
    UNSPECIFIED = 0
    HARD = 1
    SOFT = 2


class Source(enum.IntEnum):
    """Who metered a ledger event."""

    UNSPECIFIED = 0
    ROUTER = 1  # the router's event: authoritative
    ENGINE = 2  # an inference replica's record, billed because no router event came in time


@dataclass(frozen=True)
class UsageEvent:
    event_id: str
    tenant_id: str
    api_key_id: str
    model: str
    model_version: str = ""
    tags: dict[str, str] = field(default_factory=dict)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached: bool = False
    request_id: str = ""
    trace_id: str = ""
    start_us: int = 0
    end_us: int = 0
    status: UsageStatus = UsageStatus.COMPLETED
    traffic_class: TrafficClass = TrafficClass.UNSPECIFIED
    quoted_price_id: str = ""  # the price the router quoted the caller with ("" = none)
    # The leases the request was admitted against (at most one per budget).
    lease_ids: tuple[str, ...] = ()
    source: Source = Source.ROUTER  # who metered it (a replica's record billed instead: ENGINE)

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True)
class Recorded:
    """The outcome of ingesting one event: its cost, and whether the id had been seen before."""

    event_id: str
    cost_micros: int
    duplicate: bool
    level: AlertLevel = AlertLevel.NONE


@dataclass(frozen=True)
class Rejected:
    """An event of a stream that was refused; nothing was written for it."""

    event_id: str
    code: str
    message: str


@dataclass(frozen=True)
class Scope:
    kind: ScopeKind
    tenant_id: str = ""
    api_key_id: str = ""
    tag_key: str = ""
    tag_value: str = ""

    def describe(self) -> str:
        if self.kind == ScopeKind.TENANT:
            return f"tenant {self.tenant_id}"
        if self.kind == ScopeKind.API_KEY:
            return f"api key {self.api_key_id}"
        return f"tag {self.tag_key}={self.tag_value}"


@dataclass(frozen=True)
class Period:
    kind: PeriodKind
    rolling_days: int = 0
    time_zone: str = "UTC"


@dataclass(frozen=True)
class Thresholds:
    warning: int = 80
    critical: int = 100
    emergency: int = 120


@dataclass(frozen=True)
class AutoLimit:
    lookback_periods: int = 3
    factor_permille: int = 1300
    floor_micros: int = 0
    floor_tokens: int = 0


@dataclass(frozen=True)
class Budget:
    budget_id: str
    scope: Scope
    period: Period
    amount_micros: int = 0
    tokens: int = 0
    enforcement: Enforcement = Enforcement.HARD
    thresholds: Thresholds = field(default_factory=Thresholds)
    auto: AutoLimit | None = None
    webhook_url: str = ""
    create_us: int = 0
    update_us: int = 0
    # Bumped whenever the limit is raised: alert levels fire once per (period, generation).
    generation: int = 0

    @property
    def in_tokens(self) -> bool:
        if self.auto is not None:
            return self.auto.floor_tokens > 0 and self.auto.floor_micros == 0
        return self.tokens > 0


@dataclass(frozen=True)
class Firing:
    """An alert level a budget reached in a period: when, and at what spend / limit (per-mille)."""

    level: AlertLevel
    raise_us: int
    permille: int


@dataclass(frozen=True)
class BudgetState:
    budget: Budget
    period_start_us: int
    period_end_us: int
    spent_micros: int
    spent_tokens: int
    held_micros: int
    held_tokens: int
    limit_micros: int
    limit_tokens: int
    # Room of every router's outstanding leases (in the budget's own unit; the other unit is 0).
    leased_micros: int = 0
    leased_tokens: int = 0
    # The alert levels fired this period, in order (filled in for the operator views, not on the hot path).
    fired: tuple[Firing, ...] = ()

    @property
    def spent(self) -> int:
        return self.spent_tokens if self.budget.in_tokens else self.spent_micros

    @property
    def held(self) -> int:
        return self.held_tokens if self.budget.in_tokens else self.held_micros

    @property
    def leased(self) -> int:
        return self.leased_tokens if self.budget.in_tokens else self.leased_micros

    @property
    def limit(self) -> int:
        return self.limit_tokens if self.budget.in_tokens else self.limit_micros

    @property
    def permille(self) -> int:
        if self.limit <= 0:
            return 0 if self.spent <= 0 else 1_000_000
        return min(self.spent * 1000 // self.limit, 2**31 - 1)

    @property
    def level(self) -> AlertLevel:
        t = self.budget.thresholds
        for level, percent in ((AlertLevel.EMERGENCY, t.emergency), (AlertLevel.CRITICAL, t.critical), (AlertLevel.WARNING, t.warning)):
            if self.spent * 100 >= percent * self.limit and (self.limit > 0 or self.spent > 0):
                return level
        return AlertLevel.NONE


@dataclass(frozen=True)
class ReserveRequest:
    tenant_id: str
    api_key_id: str
    tags: dict[str, str]
    model: str
    model_version: str
    traffic_class: TrafficClass
    max_prompt_tokens: int
    max_completion_tokens: int
    ttl_s: int = 0
    request_id: str = ""


@dataclass(frozen=True)
class Hold:
    hold_id: str
    amount_micros: int
    tokens: int
    expire_us: int
    level: AlertLevel


@dataclass(frozen=True)
class LeaseRequest:
    router_id: str
    tenant_id: str
    api_key_id: str
    tags: dict[str, str]
    # lease id -> what the router consumed of it (cumulative, in the lease's unit)
    consumed: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class Lease:
    lease_id: str
    budget_id: str
    in_tokens: bool
    granted: int  # cumulative room granted since the lease opened
    used: int  # recorded against it by events naming it
    expire_us: int
    refresh_s: int
    level: AlertLevel


@dataclass(frozen=True)
class Verdict:
    allowed: bool
    level: AlertLevel
    reason: str
    states: list[BudgetState]


@dataclass(frozen=True)
class Alert:
    seq: int
    budget_id: str
    scope: Scope
    tenant_id: str
    level: AlertLevel
    period_start_us: int
    permille: int
    raise_us: int


@dataclass(frozen=True)
class AuditEvent:
    seq: int
    time_us: int
    actor: str
    action: str
    target: str
    details_json: str



@dataclass(frozen=True)
class EngineRecord:
    """One finished sequence as an inference replica reported it (ReportEngineUsage)."""

    request_id: str
    replica_id: str
    tenant_id: str
    api_key_id: str
    model: str
    model_version: str = ""
    tags: dict[str, str] = field(default_factory=dict)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    status: UsageStatus = UsageStatus.COMPLETED
    traffic_class: TrafficClass = TrafficClass.UNSPECIFIED
    start_us: int = 0
    end_us: int = 0
    router_id: str = ""
    trace_id: str = ""
