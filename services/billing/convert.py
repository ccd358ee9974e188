"""Conversions between the protobuf messages of BillingService and the ledger's dataclasses."""

from __future__ import annotations

import functools
from enum import IntEnum
from typing import Any, TypeVar, cast

from google.protobuf import timestamp_pb2

from autoglm.billing.v1 import billing_service_pb2 as pb2
from autoglm.common.v1 import money_pb2
from services.billing import model as m
from services.billing.lease_watch import LeaseChange
from services.billing.reports import ReportQuery, ReportRow
from services.billing.validation import check_span_id
from services.common.errors import InvalidInput
from services.common.generation import TrafficClass
from services.common.usage import AlertLevel, UsageStatus

E = TypeVar("E", bound=IntEnum)


def enum(cls: type[E], value: int, field: str) -> E:
    try:
        return cls(value)
    except ValueError as exc:
        names = ", ".join(member.name for member in cls if member.value)
        raise InvalidInput(f"{field} has unknown value {value}; use one of {names}", field=field) from exc


def level_pb(level: AlertLevel) -> pb2.AlertLevel:
    return cast(pb2.AlertLevel, int(level))


def _pb_enum(value: IntEnum) -> Any:
    return int(value)


DIMENSION_NAMES = {1: "tenant", 2: "api_key", 3: "model", 4: "model_version", 5: "tag", 6: "status", 7: "source"}
GRANULARITY_NAMES = {0: "", 1: "minute", 2: "hour", 3: "day", 4: "month"}


def to_us(ts: timestamp_pb2.Timestamp) -> int:
    return ts.seconds * 1_000_000 + ts.nanos // 1000


def ts(us: int) -> timestamp_pb2.Timestamp:
    return timestamp_pb2.Timestamp(seconds=us // 1_000_000, nanos=(us % 1_000_000) * 1000)


def money(micros: int, currency: str) -> money_pb2.Money:
    return money_pb2.Money(currency_code=currency, micros=micros)


def event(e: pb2.UsageEvent) -> m.UsageEvent:
    check_span_id(e.span_id, "event.span_id")  # not kept: only the event's span in the request's trace uses it
    return m.UsageEvent(
        event_id=e.event_id, tenant_id=e.tenant_id, api_key_id=e.api_key_id, model=e.model,
        model_version=e.model_version, tags=dict(e.tags), prompt_tokens=e.prompt_tokens,
        completion_tokens=e.completion_tokens, cached=e.cached, request_id=e.request_id, trace_id=e.trace_id,
        start_us=to_us(e.start_time) if e.HasField("start_time") else 0,
        end_us=to_us(e.end_time) if e.HasField("end_time") else 0,
        status=enum(UsageStatus, e.status, "event.status") if e.status else UsageStatus.COMPLETED,
        traffic_class=enum(TrafficClass, e.traffic_class, "event.traffic_class"),
        quoted_price_id=e.quoted_price_id[:64],
        lease_ids=tuple(e.lease_ids),
    )


def engine_record(r: pb2.EngineUsageRecord, index: int) -> m.EngineRecord:
    prefix = f"records[{index}]"
    return m.EngineRecord(
        request_id=r.request_id, replica_id=r.replica_id, tenant_id=r.tenant_id, api_key_id=r.api_key_id,
        model=r.model, model_version=r.model_version, tags=dict(r.tags), prompt_tokens=r.prompt_tokens,
        completion_tokens=r.completion_tokens,
        status=enum(UsageStatus, r.status, f"{prefix}.status") if r.status else UsageStatus.COMPLETED,
        traffic_class=enum(TrafficClass, r.traffic_class, f"{prefix}.traffic_class"),
        start_us=to_us(r.start_time) if r.HasField("start_time") else 0,
        end_us=to_us(r.end_time) if r.HasField("end_time") else 0, router_id=r.router_id, trace_id=r.trace_id)


def lease_request(r: pb2.AcquireLeasesRequest) -> m.LeaseRequest:
    return m.LeaseRequest(router_id=r.router_id, tenant_id=r.tenant_id, api_key_id=r.api_key_id, tags=dict(r.tags),
                          consumed={c.lease_id: c.consumed for c in r.consumed})


def lease_pb(lease: m.Lease) -> pb2.Lease:
    return pb2.Lease(lease_id=lease.lease_id, budget_id=lease.budget_id,
                     unit=pb2.LEASE_UNIT_TOKENS if lease.in_tokens else pb2.LEASE_UNIT_MICROS,
                     granted=lease.granted, used=lease.used, expire_time=ts(lease.expire_us),
                     refresh_seconds=lease.refresh_s, level=level_pb(lease.level))


def lease_change_pb(change: LeaseChange) -> pb2.WatchLeasesResponse:
    return pb2.WatchLeasesResponse(revision=change.revision, scope=scope_pb(change.scope),
                                   budget_id=change.budget_id, ack_wanted=change.ack_wanted,
                                   prices_changed=change.prices_changed)


def reserve_request(r: pb2.ReserveRequest) -> m.ReserveRequest:
    return m.ReserveRequest(tenant_id=r.tenant_id, api_key_id=r.api_key_id, tags=dict(r.tags), model=r.model,
                            model_version=r.model_version, traffic_class=enum(TrafficClass, r.traffic_class, "traffic_class"),
                            max_prompt_tokens=r.max_prompt_tokens, max_completion_tokens=r.max_completion_tokens,
                            ttl_s=r.ttl_seconds, request_id=r.request_id)


def budget(b: pb2.Budget) -> tuple[m.Budget, str]:
    """The budget and the currency its amounts were given in."""
    auto = None
    if b.HasField("auto"):
        auto = m.AutoLimit(lookback_periods=b.auto.lookback_periods or 3, factor_permille=b.auto.factor_permille or 1300,
                           floor_micros=b.auto.floor_amount.micros, floor_tokens=b.auto.floor_tokens)
    currency = b.amount.currency_code or b.auto.floor_amount.currency_code
    return m.Budget(
        budget_id=b.budget_id,
        scope=m.Scope(enum(m.ScopeKind, b.scope.kind, "budget.scope.kind"), b.scope.tenant_id, b.scope.api_key_id, b.scope.tag_key,
                      b.scope.tag_value),
        period=m.Period(enum(m.PeriodKind, b.period.kind, "budget.period.kind"), b.period.rolling_days, b.period.time_zone or "UTC"),
        amount_micros=b.amount.micros, tokens=b.tokens, enforcement=enum(m.Enforcement, b.enforcement, "budget.enforcement"),
        thresholds=m.Thresholds(b.thresholds.warning_percent, b.thresholds.critical_percent,
                                b.thresholds.emergency_percent),
        auto=auto, webhook_url=b.webhook_url,
    ), currency


def scope_pb(s: m.Scope) -> pb2.BudgetScope:
    return pb2.BudgetScope(kind=_pb_enum(s.kind), tenant_id=s.tenant_id, api_key_id=s.api_key_id, tag_key=s.tag_key,
                           tag_value=s.tag_value)


def budget_pb(b: m.Budget, currency: str) -> pb2.Budget:
    out = pb2.Budget(
        budget_id=b.budget_id, scope=scope_pb(b.scope),
        period=pb2.BudgetPeriod(kind=_pb_enum(b.period.kind), rolling_days=b.period.rolling_days,
                                time_zone=b.period.time_zone),
        tokens=b.tokens, enforcement=_pb_enum(b.enforcement),
        thresholds=pb2.Thresholds(warning_percent=b.thresholds.warning, critical_percent=b.thresholds.critical,
                                  emergency_percent=b.thresholds.emergency),
        webhook_url=b.webhook_url, create_time=ts(b.create_us), update_time=ts(b.update_us),
    )
    if b.amount_micros:
        out.amount.CopyFrom(money(b.amount_micros, currency))
    if b.auto is not None:
        out.auto.CopyFrom(pb2.AutoLimit(lookback_periods=b.auto.lookback_periods,
                                        factor_permille=b.auto.factor_permille,
                                        floor_amount=money(b.auto.floor_micros, currency),
                                        floor_tokens=b.auto.floor_tokens))
    return out


@functools.lru_cache(maxsize=4096)
def _status_budget(b: m.Budget, currency: str) -> pb2.Budget:
    """A budget's message as each status carries it, built once per budget version (statuses copy it)."""
    return budget_pb(b, currency)


def status_pb(s: m.BudgetState, currency: str) -> pb2.BudgetStatus:
    return pb2.BudgetStatus(
        budget=_status_budget(s.budget, currency), period_start=ts(s.period_start_us), period_end=ts(s.period_end_us),
        spent_amount=money(s.spent_micros, currency), spent_tokens=s.spent_tokens,
        held_amount=money(s.held_micros, currency), held_tokens=s.held_tokens,
        effective_amount=money(s.limit_micros, currency), effective_tokens=s.limit_tokens,
        utilization_permille=s.permille, level=level_pb(s.level),
        leased_amount=money(s.leased_micros, currency), leased_tokens=s.leased_tokens,
        fired=[pb2.BudgetAlertFiring(level=level_pb(f.level), fire_time=ts(f.raise_us), utilization_permille=f.permille)
               for f in s.fired],
    )


def alert_pb(a: m.Alert) -> pb2.WatchAlertsResponse:
    return pb2.WatchAlertsResponse(cursor=str(a.seq), budget_id=a.budget_id, scope=scope_pb(a.scope),
                                   level=level_pb(a.level), period_start=ts(a.period_start_us),
                                   utilization_permille=a.permille, raise_time=ts(a.raise_us))


def report_query(r: pb2.GetUsageReportRequest) -> ReportQuery:
    return ReportQuery(start_us=to_us(r.start_time), end_us=to_us(r.end_time),
                       group_by=tuple(DIMENSION_NAMES.get(d, f"unknown({d})") for d in r.group_by),
                       tag_key=r.tag_key, granularity=GRANULARITY_NAMES.get(r.granularity, f"unknown({r.granularity})"),
                       tenant_id=r.tenant_id, top_n=r.top_n)


def report_row_pb(row: ReportRow, currency: str) -> pb2.UsageReportRow:
    return pb2.UsageReportRow(bucket_start=ts(row.bucket_start_us), group=row.group, requests=row.requests,
                              prompt_tokens=row.prompt_tokens, completion_tokens=row.completion_tokens,
                              cost=money(row.cost_micros, currency), cached_requests=row.cached_requests,
                              anomalous=row.anomalous)


def audit_pb(a: m.AuditEvent) -> pb2.AuditEvent:
    return pb2.AuditEvent(audit_id=str(a.seq), time=ts(a.time_us), actor=a.actor, action=a.action, target=a.target,
                          details_json=a.details_json)
