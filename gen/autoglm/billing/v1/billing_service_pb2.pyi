import datetime

from autoglm.common.v1 import generation_pb2 as _generation_pb2
from autoglm.common.v1 import money_pb2 as _money_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class UsageStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    USAGE_STATUS_UNSPECIFIED: _ClassVar[UsageStatus]
    USAGE_STATUS_COMPLETED: _ClassVar[UsageStatus]
    USAGE_STATUS_CANCELLED: _ClassVar[UsageStatus]
    USAGE_STATUS_FAILED: _ClassVar[UsageStatus]

class AlertLevel(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ALERT_LEVEL_UNSPECIFIED: _ClassVar[AlertLevel]
    ALERT_LEVEL_WARNING: _ClassVar[AlertLevel]
    ALERT_LEVEL_CRITICAL: _ClassVar[AlertLevel]
    ALERT_LEVEL_EMERGENCY: _ClassVar[AlertLevel]

class LeaseUnit(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    LEASE_UNIT_UNSPECIFIED: _ClassVar[LeaseUnit]
    LEASE_UNIT_MICROS: _ClassVar[LeaseUnit]
    LEASE_UNIT_TOKENS: _ClassVar[LeaseUnit]

class ScopeKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SCOPE_KIND_UNSPECIFIED: _ClassVar[ScopeKind]
    SCOPE_KIND_TENANT: _ClassVar[ScopeKind]
    SCOPE_KIND_API_KEY: _ClassVar[ScopeKind]
    SCOPE_KIND_TAG: _ClassVar[ScopeKind]

class PeriodKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PERIOD_KIND_UNSPECIFIED: _ClassVar[PeriodKind]
    PERIOD_KIND_DAILY: _ClassVar[PeriodKind]
    PERIOD_KIND_WEEKLY: _ClassVar[PeriodKind]
    PERIOD_KIND_MONTHLY: _ClassVar[PeriodKind]
    PERIOD_KIND_ROLLING_DAYS: _ClassVar[PeriodKind]

class Enforcement(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ENFORCEMENT_UNSPECIFIED: _ClassVar[Enforcement]
    ENFORCEMENT_HARD: _ClassVar[Enforcement]
    ENFORCEMENT_SOFT: _ClassVar[Enforcement]

class ReportDimension(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    REPORT_DIMENSION_UNSPECIFIED: _ClassVar[ReportDimension]
    REPORT_DIMENSION_TENANT: _ClassVar[ReportDimension]
    REPORT_DIMENSION_API_KEY: _ClassVar[ReportDimension]
    REPORT_DIMENSION_MODEL: _ClassVar[ReportDimension]
    REPORT_DIMENSION_MODEL_VERSION: _ClassVar[ReportDimension]
    REPORT_DIMENSION_TAG: _ClassVar[ReportDimension]
    REPORT_DIMENSION_STATUS: _ClassVar[ReportDimension]
    REPORT_DIMENSION_SOURCE: _ClassVar[ReportDimension]

class Granularity(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    GRANULARITY_UNSPECIFIED: _ClassVar[Granularity]
    GRANULARITY_MINUTE: _ClassVar[Granularity]
    GRANULARITY_HOUR: _ClassVar[Granularity]
    GRANULARITY_DAY: _ClassVar[Granularity]
    GRANULARITY_MONTH: _ClassVar[Granularity]
USAGE_STATUS_UNSPECIFIED: UsageStatus
USAGE_STATUS_COMPLETED: UsageStatus
USAGE_STATUS_CANCELLED: UsageStatus
USAGE_STATUS_FAILED: UsageStatus
ALERT_LEVEL_UNSPECIFIED: AlertLevel
ALERT_LEVEL_WARNING: AlertLevel
ALERT_LEVEL_CRITICAL: AlertLevel
ALERT_LEVEL_EMERGENCY: AlertLevel
LEASE_UNIT_UNSPECIFIED: LeaseUnit
LEASE_UNIT_MICROS: LeaseUnit
LEASE_UNIT_TOKENS: LeaseUnit
SCOPE_KIND_UNSPECIFIED: ScopeKind
SCOPE_KIND_TENANT: ScopeKind
SCOPE_KIND_API_KEY: ScopeKind
SCOPE_KIND_TAG: ScopeKind
PERIOD_KIND_UNSPECIFIED: PeriodKind
PERIOD_KIND_DAILY: PeriodKind
PERIOD_KIND_WEEKLY: PeriodKind
PERIOD_KIND_MONTHLY: PeriodKind
PERIOD_KIND_ROLLING_DAYS: PeriodKind
ENFORCEMENT_UNSPECIFIED: Enforcement
ENFORCEMENT_HARD: Enforcement
ENFORCEMENT_SOFT: Enforcement
REPORT_DIMENSION_UNSPECIFIED: ReportDimension
REPORT_DIMENSION_TENANT: ReportDimension
REPORT_DIMENSION_API_KEY: ReportDimension
REPORT_DIMENSION_MODEL: ReportDimension
REPORT_DIMENSION_MODEL_VERSION: ReportDimension
REPORT_DIMENSION_TAG: ReportDimension
REPORT_DIMENSION_STATUS: ReportDimension
REPORT_DIMENSION_SOURCE: ReportDimension
GRANULARITY_UNSPECIFIED: Granularity
GRANULARITY_MINUTE: Granularity
GRANULARITY_HOUR: Granularity
GRANULARITY_DAY: Granularity
GRANULARITY_MONTH: Granularity

class UsageEvent(_message.Message):
    __slots__ = ("event_id", "tenant_id", "api_key_id", "model", "model_version", "tags", "prompt_tokens", "completion_tokens", "cached", "request_id", "trace_id", "start_time", "end_time", "status", "traffic_class", "quoted_price_id", "lease_ids", "span_id")
    class TagsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    API_KEY_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    TAGS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CACHED_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TRACE_ID_FIELD_NUMBER: _ClassVar[int]
    START_TIME_FIELD_NUMBER: _ClassVar[int]
    END_TIME_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    TRAFFIC_CLASS_FIELD_NUMBER: _ClassVar[int]
    QUOTED_PRICE_ID_FIELD_NUMBER: _ClassVar[int]
    LEASE_IDS_FIELD_NUMBER: _ClassVar[int]
    SPAN_ID_FIELD_NUMBER: _ClassVar[int]
    event_id: str
    tenant_id: str
    api_key_id: str
    model: str
    model_version: str
    tags: _containers.ScalarMap[str, str]
    prompt_tokens: int
    completion_tokens: int
    cached: bool
    request_id: str
    trace_id: str
    start_time: _timestamp_pb2.Timestamp
    end_time: _timestamp_pb2.Timestamp
    status: UsageStatus
    traffic_class: _generation_pb2.TrafficClass
    quoted_price_id: str
    lease_ids: _containers.RepeatedScalarFieldContainer[str]
    span_id: str
    def __init__(self, event_id: _Optional[str] = ..., tenant_id: _Optional[str] = ..., api_key_id: _Optional[str] = ..., model: _Optional[str] = ..., model_version: _Optional[str] = ..., tags: _Optional[_Mapping[str, str]] = ..., prompt_tokens: _Optional[int] = ..., completion_tokens: _Optional[int] = ..., cached: _Optional[bool] = ..., request_id: _Optional[str] = ..., trace_id: _Optional[str] = ..., start_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., end_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., status: _Optional[_Union[UsageStatus, str]] = ..., traffic_class: _Optional[_Union[_generation_pb2.TrafficClass, str]] = ..., quoted_price_id: _Optional[str] = ..., lease_ids: _Optional[_Iterable[str]] = ..., span_id: _Optional[str] = ...) -> None: ...

class RecordUsageRequest(_message.Message):
    __slots__ = ("event",)
    EVENT_FIELD_NUMBER: _ClassVar[int]
    event: UsageEvent
    def __init__(self, event: _Optional[_Union[UsageEvent, _Mapping]] = ...) -> None: ...

class RecordUsageResponse(_message.Message):
    __slots__ = ("event_id", "duplicate", "cost")
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_FIELD_NUMBER: _ClassVar[int]
    COST_FIELD_NUMBER: _ClassVar[int]
    event_id: str
    duplicate: bool
    cost: _money_pb2.Money
    def __init__(self, event_id: _Optional[str] = ..., duplicate: _Optional[bool] = ..., cost: _Optional[_Union[_money_pb2.Money, _Mapping]] = ...) -> None: ...

class StreamUsageRequest(_message.Message):
    __slots__ = ("event", "events")
    EVENT_FIELD_NUMBER: _ClassVar[int]
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    event: UsageEvent
    events: _containers.RepeatedCompositeFieldContainer[UsageEvent]
    def __init__(self, event: _Optional[_Union[UsageEvent, _Mapping]] = ..., events: _Optional[_Iterable[_Union[UsageEvent, _Mapping]]] = ...) -> None: ...

class StreamUsageResponse(_message.Message):
    __slots__ = ("event_id", "duplicate", "cost", "error_code", "error_message", "acks")
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_FIELD_NUMBER: _ClassVar[int]
    COST_FIELD_NUMBER: _ClassVar[int]
    ERROR_CODE_FIELD_NUMBER: _ClassVar[int]
    ERROR_MESSAGE_FIELD_NUMBER: _ClassVar[int]
    ACKS_FIELD_NUMBER: _ClassVar[int]
    event_id: str
    duplicate: bool
    cost: _money_pb2.Money
    error_code: str
    error_message: str
    acks: _containers.RepeatedCompositeFieldContainer[StreamUsageResponse]
    def __init__(self, event_id: _Optional[str] = ..., duplicate: _Optional[bool] = ..., cost: _Optional[_Union[_money_pb2.Money, _Mapping]] = ..., error_code: _Optional[str] = ..., error_message: _Optional[str] = ..., acks: _Optional[_Iterable[_Union[StreamUsageResponse, _Mapping]]] = ...) -> None: ...

class ReserveRequest(_message.Message):
    __slots__ = ("tenant_id", "api_key_id", "tags", "model", "model_version", "traffic_class", "max_prompt_tokens", "max_completion_tokens", "ttl_seconds", "request_id")
    class TagsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    API_KEY_ID_FIELD_NUMBER: _ClassVar[int]
    TAGS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    TRAFFIC_CLASS_FIELD_NUMBER: _ClassVar[int]
    MAX_PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_COMPLETION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TTL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    tenant_id: str
    api_key_id: str
    tags: _containers.ScalarMap[str, str]
    model: str
    model_version: str
    traffic_class: _generation_pb2.TrafficClass
    max_prompt_tokens: int
    max_completion_tokens: int
    ttl_seconds: int
    request_id: str
    def __init__(self, tenant_id: _Optional[str] = ..., api_key_id: _Optional[str] = ..., tags: _Optional[_Mapping[str, str]] = ..., model: _Optional[str] = ..., model_version: _Optional[str] = ..., traffic_class: _Optional[_Union[_generation_pb2.TrafficClass, str]] = ..., max_prompt_tokens: _Optional[int] = ..., max_completion_tokens: _Optional[int] = ..., ttl_seconds: _Optional[int] = ..., request_id: _Optional[str] = ...) -> None: ...

class ReserveResponse(_message.Message):
    __slots__ = ("hold_id", "amount", "expire_time", "level")
    HOLD_ID_FIELD_NUMBER: _ClassVar[int]
    AMOUNT_FIELD_NUMBER: _ClassVar[int]
    EXPIRE_TIME_FIELD_NUMBER: _ClassVar[int]
    LEVEL_FIELD_NUMBER: _ClassVar[int]
    hold_id: str
    amount: _money_pb2.Money
    expire_time: _timestamp_pb2.Timestamp
    level: AlertLevel
    def __init__(self, hold_id: _Optional[str] = ..., amount: _Optional[_Union[_money_pb2.Money, _Mapping]] = ..., expire_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., level: _Optional[_Union[AlertLevel, str]] = ...) -> None: ...

class SettleRequest(_message.Message):
    __slots__ = ("hold_id", "event")
    HOLD_ID_FIELD_NUMBER: _ClassVar[int]
    EVENT_FIELD_NUMBER: _ClassVar[int]
    hold_id: str
    event: UsageEvent
    def __init__(self, hold_id: _Optional[str] = ..., event: _Optional[_Union[UsageEvent, _Mapping]] = ...) -> None: ...

class SettleResponse(_message.Message):
    __slots__ = ("cost", "duplicate", "level")
    COST_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_FIELD_NUMBER: _ClassVar[int]
    LEVEL_FIELD_NUMBER: _ClassVar[int]
    cost: _money_pb2.Money
    duplicate: bool
    level: AlertLevel
    def __init__(self, cost: _Optional[_Union[_money_pb2.Money, _Mapping]] = ..., duplicate: _Optional[bool] = ..., level: _Optional[_Union[AlertLevel, str]] = ...) -> None: ...

class ReleaseRequest(_message.Message):
    __slots__ = ("hold_id",)
    HOLD_ID_FIELD_NUMBER: _ClassVar[int]
    hold_id: str
    def __init__(self, hold_id: _Optional[str] = ...) -> None: ...

class ReleaseResponse(_message.Message):
    __slots__ = ("released",)
    RELEASED_FIELD_NUMBER: _ClassVar[int]
    released: bool
    def __init__(self, released: _Optional[bool] = ...) -> None: ...

class LeaseConsumption(_message.Message):
    __slots__ = ("lease_id", "consumed")
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    CONSUMED_FIELD_NUMBER: _ClassVar[int]
    lease_id: str
    consumed: int
    def __init__(self, lease_id: _Optional[str] = ..., consumed: _Optional[int] = ...) -> None: ...

class AcquireLeasesRequest(_message.Message):
    __slots__ = ("router_id", "tenant_id", "api_key_id", "tags", "consumed")
    class TagsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ROUTER_ID_FIELD_NUMBER: _ClassVar[int]
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    API_KEY_ID_FIELD_NUMBER: _ClassVar[int]
    TAGS_FIELD_NUMBER: _ClassVar[int]
    CONSUMED_FIELD_NUMBER: _ClassVar[int]
    router_id: str
    tenant_id: str
    api_key_id: str
    tags: _containers.ScalarMap[str, str]
    consumed: _containers.RepeatedCompositeFieldContainer[LeaseConsumption]
    def __init__(self, router_id: _Optional[str] = ..., tenant_id: _Optional[str] = ..., api_key_id: _Optional[str] = ..., tags: _Optional[_Mapping[str, str]] = ..., consumed: _Optional[_Iterable[_Union[LeaseConsumption, _Mapping]]] = ...) -> None: ...

class Lease(_message.Message):
    __slots__ = ("lease_id", "budget_id", "unit", "granted", "used", "expire_time", "refresh_seconds", "level")
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    BUDGET_ID_FIELD_NUMBER: _ClassVar[int]
    UNIT_FIELD_NUMBER: _ClassVar[int]
    GRANTED_FIELD_NUMBER: _ClassVar[int]
    USED_FIELD_NUMBER: _ClassVar[int]
    EXPIRE_TIME_FIELD_NUMBER: _ClassVar[int]
    REFRESH_SECONDS_FIELD_NUMBER: _ClassVar[int]
    LEVEL_FIELD_NUMBER: _ClassVar[int]
    lease_id: str
    budget_id: str
    unit: LeaseUnit
    granted: int
    used: int
    expire_time: _timestamp_pb2.Timestamp
    refresh_seconds: int
    level: AlertLevel
    def __init__(self, lease_id: _Optional[str] = ..., budget_id: _Optional[str] = ..., unit: _Optional[_Union[LeaseUnit, str]] = ..., granted: _Optional[int] = ..., used: _Optional[int] = ..., expire_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., refresh_seconds: _Optional[int] = ..., level: _Optional[_Union[AlertLevel, str]] = ...) -> None: ...

class AcquireLeasesResponse(_message.Message):
    __slots__ = ("leases",)
    LEASES_FIELD_NUMBER: _ClassVar[int]
    leases: _containers.RepeatedCompositeFieldContainer[Lease]
    def __init__(self, leases: _Optional[_Iterable[_Union[Lease, _Mapping]]] = ...) -> None: ...

class ReturnLeaseRequest(_message.Message):
    __slots__ = ("lease_id", "router_id", "consumed")
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    ROUTER_ID_FIELD_NUMBER: _ClassVar[int]
    CONSUMED_FIELD_NUMBER: _ClassVar[int]
    lease_id: str
    router_id: str
    consumed: int
    def __init__(self, lease_id: _Optional[str] = ..., router_id: _Optional[str] = ..., consumed: _Optional[int] = ...) -> None: ...

class ReturnLeaseResponse(_message.Message):
    __slots__ = ("returned",)
    RETURNED_FIELD_NUMBER: _ClassVar[int]
    returned: bool
    def __init__(self, returned: _Optional[bool] = ...) -> None: ...

class CheckBudgetRequest(_message.Message):
    __slots__ = ("tenant_id", "api_key_id", "tags", "traffic_class")
    class TagsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    API_KEY_ID_FIELD_NUMBER: _ClassVar[int]
    TAGS_FIELD_NUMBER: _ClassVar[int]
    TRAFFIC_CLASS_FIELD_NUMBER: _ClassVar[int]
    tenant_id: str
    api_key_id: str
    tags: _containers.ScalarMap[str, str]
    traffic_class: _generation_pb2.TrafficClass
    def __init__(self, tenant_id: _Optional[str] = ..., api_key_id: _Optional[str] = ..., tags: _Optional[_Mapping[str, str]] = ..., traffic_class: _Optional[_Union[_generation_pb2.TrafficClass, str]] = ...) -> None: ...

class CheckBudgetResponse(_message.Message):
    __slots__ = ("allowed", "level", "reason", "budgets")
    ALLOWED_FIELD_NUMBER: _ClassVar[int]
    LEVEL_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    BUDGETS_FIELD_NUMBER: _ClassVar[int]
    allowed: bool
    level: AlertLevel
    reason: str
    budgets: _containers.RepeatedCompositeFieldContainer[BudgetStatus]
    def __init__(self, allowed: _Optional[bool] = ..., level: _Optional[_Union[AlertLevel, str]] = ..., reason: _Optional[str] = ..., budgets: _Optional[_Iterable[_Union[BudgetStatus, _Mapping]]] = ...) -> None: ...

class BudgetScope(_message.Message):
    __slots__ = ("kind", "tenant_id", "api_key_id", "tag_key", "tag_value")
    KIND_FIELD_NUMBER: _ClassVar[int]
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    API_KEY_ID_FIELD_NUMBER: _ClassVar[int]
    TAG_KEY_FIELD_NUMBER: _ClassVar[int]
    TAG_VALUE_FIELD_NUMBER: _ClassVar[int]
    kind: ScopeKind
    tenant_id: str
    api_key_id: str
    tag_key: str
    tag_value: str
    def __init__(self, kind: _Optional[_Union[ScopeKind, str]] = ..., tenant_id: _Optional[str] = ..., api_key_id: _Optional[str] = ..., tag_key: _Optional[str] = ..., tag_value: _Optional[str] = ...) -> None: ...

class BudgetPeriod(_message.Message):
    __slots__ = ("kind", "rolling_days", "time_zone")
    KIND_FIELD_NUMBER: _ClassVar[int]
    ROLLING_DAYS_FIELD_NUMBER: _ClassVar[int]
    TIME_ZONE_FIELD_NUMBER: _ClassVar[int]
    kind: PeriodKind
    rolling_days: int
    time_zone: str
    def __init__(self, kind: _Optional[_Union[PeriodKind, str]] = ..., rolling_days: _Optional[int] = ..., time_zone: _Optional[str] = ...) -> None: ...

class AutoLimit(_message.Message):
    __slots__ = ("lookback_periods", "factor_permille", "floor_amount", "floor_tokens")
    LOOKBACK_PERIODS_FIELD_NUMBER: _ClassVar[int]
    FACTOR_PERMILLE_FIELD_NUMBER: _ClassVar[int]
    FLOOR_AMOUNT_FIELD_NUMBER: _ClassVar[int]
    FLOOR_TOKENS_FIELD_NUMBER: _ClassVar[int]
    lookback_periods: int
    factor_permille: int
    floor_amount: _money_pb2.Money
    floor_tokens: int
    def __init__(self, lookback_periods: _Optional[int] = ..., factor_permille: _Optional[int] = ..., floor_amount: _Optional[_Union[_money_pb2.Money, _Mapping]] = ..., floor_tokens: _Optional[int] = ...) -> None: ...

class Thresholds(_message.Message):
    __slots__ = ("warning_percent", "critical_percent", "emergency_percent")
    WARNING_PERCENT_FIELD_NUMBER: _ClassVar[int]
    CRITICAL_PERCENT_FIELD_NUMBER: _ClassVar[int]
    EMERGENCY_PERCENT_FIELD_NUMBER: _ClassVar[int]
    warning_percent: int
    critical_percent: int
    emergency_percent: int
    def __init__(self, warning_percent: _Optional[int] = ..., critical_percent: _Optional[int] = ..., emergency_percent: _Optional[int] = ...) -> None: ...

class Budget(_message.Message):
    __slots__ = ("budget_id", "scope", "period", "amount", "tokens", "enforcement", "thresholds", "auto", "webhook_url", "create_time", "update_time")
    BUDGET_ID_FIELD_NUMBER: _ClassVar[int]
    SCOPE_FIELD_NUMBER: _ClassVar[int]
    PERIOD_FIELD_NUMBER: _ClassVar[int]
    AMOUNT_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    ENFORCEMENT_FIELD_NUMBER: _ClassVar[int]
    THRESHOLDS_FIELD_NUMBER: _ClassVar[int]
    AUTO_FIELD_NUMBER: _ClassVar[int]
    WEBHOOK_URL_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    UPDATE_TIME_FIELD_NUMBER: _ClassVar[int]
    budget_id: str
    scope: BudgetScope
    period: BudgetPeriod
    amount: _money_pb2.Money
    tokens: int
    enforcement: Enforcement
    thresholds: Thresholds
    auto: AutoLimit
    webhook_url: str
    create_time: _timestamp_pb2.Timestamp
    update_time: _timestamp_pb2.Timestamp
    def __init__(self, budget_id: _Optional[str] = ..., scope: _Optional[_Union[BudgetScope, _Mapping]] = ..., period: _Optional[_Union[BudgetPeriod, _Mapping]] = ..., amount: _Optional[_Union[_money_pb2.Money, _Mapping]] = ..., tokens: _Optional[int] = ..., enforcement: _Optional[_Union[Enforcement, str]] = ..., thresholds: _Optional[_Union[Thresholds, _Mapping]] = ..., auto: _Optional[_Union[AutoLimit, _Mapping]] = ..., webhook_url: _Optional[str] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., update_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class BudgetStatus(_message.Message):
    __slots__ = ("budget", "period_start", "period_end", "spent_amount", "spent_tokens", "held_amount", "held_tokens", "effective_amount", "effective_tokens", "utilization_permille", "level", "leased_amount", "leased_tokens", "fired")
    BUDGET_FIELD_NUMBER: _ClassVar[int]
    PERIOD_START_FIELD_NUMBER: _ClassVar[int]
    PERIOD_END_FIELD_NUMBER: _ClassVar[int]
    SPENT_AMOUNT_FIELD_NUMBER: _ClassVar[int]
    SPENT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    HELD_AMOUNT_FIELD_NUMBER: _ClassVar[int]
    HELD_TOKENS_FIELD_NUMBER: _ClassVar[int]
    EFFECTIVE_AMOUNT_FIELD_NUMBER: _ClassVar[int]
    EFFECTIVE_TOKENS_FIELD_NUMBER: _ClassVar[int]
    UTILIZATION_PERMILLE_FIELD_NUMBER: _ClassVar[int]
    LEVEL_FIELD_NUMBER: _ClassVar[int]
    LEASED_AMOUNT_FIELD_NUMBER: _ClassVar[int]
    LEASED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    FIRED_FIELD_NUMBER: _ClassVar[int]
    budget: Budget
    period_start: _timestamp_pb2.Timestamp
    period_end: _timestamp_pb2.Timestamp
    spent_amount: _money_pb2.Money
    spent_tokens: int
    held_amount: _money_pb2.Money
    held_tokens: int
    effective_amount: _money_pb2.Money
    effective_tokens: int
    utilization_permille: int
    level: AlertLevel
    leased_amount: _money_pb2.Money
    leased_tokens: int
    fired: _containers.RepeatedCompositeFieldContainer[BudgetAlertFiring]
    def __init__(self, budget: _Optional[_Union[Budget, _Mapping]] = ..., period_start: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., period_end: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., spent_amount: _Optional[_Union[_money_pb2.Money, _Mapping]] = ..., spent_tokens: _Optional[int] = ..., held_amount: _Optional[_Union[_money_pb2.Money, _Mapping]] = ..., held_tokens: _Optional[int] = ..., effective_amount: _Optional[_Union[_money_pb2.Money, _Mapping]] = ..., effective_tokens: _Optional[int] = ..., utilization_permille: _Optional[int] = ..., level: _Optional[_Union[AlertLevel, str]] = ..., leased_amount: _Optional[_Union[_money_pb2.Money, _Mapping]] = ..., leased_tokens: _Optional[int] = ..., fired: _Optional[_Iterable[_Union[BudgetAlertFiring, _Mapping]]] = ...) -> None: ...

class BudgetAlertFiring(_message.Message):
    __slots__ = ("level", "fire_time", "utilization_permille")
    LEVEL_FIELD_NUMBER: _ClassVar[int]
    FIRE_TIME_FIELD_NUMBER: _ClassVar[int]
    UTILIZATION_PERMILLE_FIELD_NUMBER: _ClassVar[int]
    level: AlertLevel
    fire_time: _timestamp_pb2.Timestamp
    utilization_permille: int
    def __init__(self, level: _Optional[_Union[AlertLevel, str]] = ..., fire_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., utilization_permille: _Optional[int] = ...) -> None: ...

class CreateBudgetRequest(_message.Message):
    __slots__ = ("budget", "actor")
    BUDGET_FIELD_NUMBER: _ClassVar[int]
    ACTOR_FIELD_NUMBER: _ClassVar[int]
    budget: Budget
    actor: str
    def __init__(self, budget: _Optional[_Union[Budget, _Mapping]] = ..., actor: _Optional[str] = ...) -> None: ...

class CreateBudgetResponse(_message.Message):
    __slots__ = ("budget",)
    BUDGET_FIELD_NUMBER: _ClassVar[int]
    budget: Budget
    def __init__(self, budget: _Optional[_Union[Budget, _Mapping]] = ...) -> None: ...

class GetBudgetRequest(_message.Message):
    __slots__ = ("budget_id",)
    BUDGET_ID_FIELD_NUMBER: _ClassVar[int]
    budget_id: str
    def __init__(self, budget_id: _Optional[str] = ...) -> None: ...

class GetBudgetResponse(_message.Message):
    __slots__ = ("status",)
    STATUS_FIELD_NUMBER: _ClassVar[int]
    status: BudgetStatus
    def __init__(self, status: _Optional[_Union[BudgetStatus, _Mapping]] = ...) -> None: ...

class ListBudgetsRequest(_message.Message):
    __slots__ = ("tenant_id",)
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    tenant_id: str
    def __init__(self, tenant_id: _Optional[str] = ...) -> None: ...

class ListBudgetsResponse(_message.Message):
    __slots__ = ("budgets",)
    BUDGETS_FIELD_NUMBER: _ClassVar[int]
    budgets: _containers.RepeatedCompositeFieldContainer[BudgetStatus]
    def __init__(self, budgets: _Optional[_Iterable[_Union[BudgetStatus, _Mapping]]] = ...) -> None: ...

class UpdateBudgetRequest(_message.Message):
    __slots__ = ("budget", "actor")
    BUDGET_FIELD_NUMBER: _ClassVar[int]
    ACTOR_FIELD_NUMBER: _ClassVar[int]
    budget: Budget
    actor: str
    def __init__(self, budget: _Optional[_Union[Budget, _Mapping]] = ..., actor: _Optional[str] = ...) -> None: ...

class UpdateBudgetResponse(_message.Message):
    __slots__ = ("budget",)
    BUDGET_FIELD_NUMBER: _ClassVar[int]
    budget: Budget
    def __init__(self, budget: _Optional[_Union[Budget, _Mapping]] = ...) -> None: ...

class DeleteBudgetRequest(_message.Message):
    __slots__ = ("budget_id", "actor")
    BUDGET_ID_FIELD_NUMBER: _ClassVar[int]
    ACTOR_FIELD_NUMBER: _ClassVar[int]
    budget_id: str
    actor: str
    def __init__(self, budget_id: _Optional[str] = ..., actor: _Optional[str] = ...) -> None: ...

class DeleteBudgetResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Price(_message.Message):
    __slots__ = ("price_id", "model", "model_version", "input_per_million", "output_per_million", "cached_per_million", "effective_time")
    PRICE_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    INPUT_PER_MILLION_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_PER_MILLION_FIELD_NUMBER: _ClassVar[int]
    CACHED_PER_MILLION_FIELD_NUMBER: _ClassVar[int]
    EFFECTIVE_TIME_FIELD_NUMBER: _ClassVar[int]
    price_id: str
    model: str
    model_version: str
    input_per_million: _money_pb2.Money
    output_per_million: _money_pb2.Money
    cached_per_million: _money_pb2.Money
    effective_time: _timestamp_pb2.Timestamp
    def __init__(self, price_id: _Optional[str] = ..., model: _Optional[str] = ..., model_version: _Optional[str] = ..., input_per_million: _Optional[_Union[_money_pb2.Money, _Mapping]] = ..., output_per_million: _Optional[_Union[_money_pb2.Money, _Mapping]] = ..., cached_per_million: _Optional[_Union[_money_pb2.Money, _Mapping]] = ..., effective_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class CreatePriceRequest(_message.Message):
    __slots__ = ("price", "actor")
    PRICE_FIELD_NUMBER: _ClassVar[int]
    ACTOR_FIELD_NUMBER: _ClassVar[int]
    price: Price
    actor: str
    def __init__(self, price: _Optional[_Union[Price, _Mapping]] = ..., actor: _Optional[str] = ...) -> None: ...

class CreatePriceResponse(_message.Message):
    __slots__ = ("price",)
    PRICE_FIELD_NUMBER: _ClassVar[int]
    price: Price
    def __init__(self, price: _Optional[_Union[Price, _Mapping]] = ...) -> None: ...

class ListPricesRequest(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: str
    def __init__(self, model: _Optional[str] = ...) -> None: ...

class ListPricesResponse(_message.Message):
    __slots__ = ("prices",)
    PRICES_FIELD_NUMBER: _ClassVar[int]
    prices: _containers.RepeatedCompositeFieldContainer[Price]
    def __init__(self, prices: _Optional[_Iterable[_Union[Price, _Mapping]]] = ...) -> None: ...

class DeletePriceRequest(_message.Message):
    __slots__ = ("price_id", "actor")
    PRICE_ID_FIELD_NUMBER: _ClassVar[int]
    ACTOR_FIELD_NUMBER: _ClassVar[int]
    price_id: str
    actor: str
    def __init__(self, price_id: _Optional[str] = ..., actor: _Optional[str] = ...) -> None: ...

class DeletePriceResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class WatchAlertsRequest(_message.Message):
    __slots__ = ("cursor", "tenant_id")
    CURSOR_FIELD_NUMBER: _ClassVar[int]
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    cursor: str
    tenant_id: str
    def __init__(self, cursor: _Optional[str] = ..., tenant_id: _Optional[str] = ...) -> None: ...

class WatchAlertsResponse(_message.Message):
    __slots__ = ("cursor", "budget_id", "scope", "level", "period_start", "utilization_permille", "raise_time")
    CURSOR_FIELD_NUMBER: _ClassVar[int]
    BUDGET_ID_FIELD_NUMBER: _ClassVar[int]
    SCOPE_FIELD_NUMBER: _ClassVar[int]
    LEVEL_FIELD_NUMBER: _ClassVar[int]
    PERIOD_START_FIELD_NUMBER: _ClassVar[int]
    UTILIZATION_PERMILLE_FIELD_NUMBER: _ClassVar[int]
    RAISE_TIME_FIELD_NUMBER: _ClassVar[int]
    cursor: str
    budget_id: str
    scope: BudgetScope
    level: AlertLevel
    period_start: _timestamp_pb2.Timestamp
    utilization_permille: int
    raise_time: _timestamp_pb2.Timestamp
    def __init__(self, cursor: _Optional[str] = ..., budget_id: _Optional[str] = ..., scope: _Optional[_Union[BudgetScope, _Mapping]] = ..., level: _Optional[_Union[AlertLevel, str]] = ..., period_start: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., utilization_permille: _Optional[int] = ..., raise_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class GetUsageReportRequest(_message.Message):
    __slots__ = ("start_time", "end_time", "group_by", "tag_key", "granularity", "tenant_id", "top_n")
    START_TIME_FIELD_NUMBER: _ClassVar[int]
    END_TIME_FIELD_NUMBER: _ClassVar[int]
    GROUP_BY_FIELD_NUMBER: _ClassVar[int]
    TAG_KEY_FIELD_NUMBER: _ClassVar[int]
    GRANULARITY_FIELD_NUMBER: _ClassVar[int]
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    TOP_N_FIELD_NUMBER: _ClassVar[int]
    start_time: _timestamp_pb2.Timestamp
    end_time: _timestamp_pb2.Timestamp
    group_by: _containers.RepeatedScalarFieldContainer[ReportDimension]
    tag_key: str
    granularity: Granularity
    tenant_id: str
    top_n: int
    def __init__(self, start_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., end_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., group_by: _Optional[_Iterable[_Union[ReportDimension, str]]] = ..., tag_key: _Optional[str] = ..., granularity: _Optional[_Union[Granularity, str]] = ..., tenant_id: _Optional[str] = ..., top_n: _Optional[int] = ...) -> None: ...

class UsageReportRow(_message.Message):
    __slots__ = ("bucket_start", "group", "requests", "prompt_tokens", "completion_tokens", "cost", "cached_requests", "anomalous")
    class GroupEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    BUCKET_START_FIELD_NUMBER: _ClassVar[int]
    GROUP_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COST_FIELD_NUMBER: _ClassVar[int]
    CACHED_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    ANOMALOUS_FIELD_NUMBER: _ClassVar[int]
    bucket_start: _timestamp_pb2.Timestamp
    group: _containers.ScalarMap[str, str]
    requests: int
    prompt_tokens: int
    completion_tokens: int
    cost: _money_pb2.Money
    cached_requests: int
    anomalous: bool
    def __init__(self, bucket_start: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., group: _Optional[_Mapping[str, str]] = ..., requests: _Optional[int] = ..., prompt_tokens: _Optional[int] = ..., completion_tokens: _Optional[int] = ..., cost: _Optional[_Union[_money_pb2.Money, _Mapping]] = ..., cached_requests: _Optional[int] = ..., anomalous: _Optional[bool] = ...) -> None: ...

class GetUsageReportResponse(_message.Message):
    __slots__ = ("rows", "total")
    ROWS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    rows: _containers.RepeatedCompositeFieldContainer[UsageReportRow]
    total: UsageReportRow
    def __init__(self, rows: _Optional[_Iterable[_Union[UsageReportRow, _Mapping]]] = ..., total: _Optional[_Union[UsageReportRow, _Mapping]] = ...) -> None: ...

class ListAuditEventsRequest(_message.Message):
    __slots__ = ("start_time", "end_time", "action", "page_size", "page_token")
    START_TIME_FIELD_NUMBER: _ClassVar[int]
    END_TIME_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    start_time: _timestamp_pb2.Timestamp
    end_time: _timestamp_pb2.Timestamp
    action: str
    page_size: int
    page_token: str
    def __init__(self, start_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., end_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., action: _Optional[str] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class AuditEvent(_message.Message):
    __slots__ = ("audit_id", "time", "actor", "action", "target", "details_json")
    AUDIT_ID_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    ACTOR_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    DETAILS_JSON_FIELD_NUMBER: _ClassVar[int]
    audit_id: str
    time: _timestamp_pb2.Timestamp
    actor: str
    action: str
    target: str
    details_json: str
    def __init__(self, audit_id: _Optional[str] = ..., time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., actor: _Optional[str] = ..., action: _Optional[str] = ..., target: _Optional[str] = ..., details_json: _Optional[str] = ...) -> None: ...

class ListAuditEventsResponse(_message.Message):
    __slots__ = ("events", "next_page_token")
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    events: _containers.RepeatedCompositeFieldContainer[AuditEvent]
    next_page_token: str
    def __init__(self, events: _Optional[_Iterable[_Union[AuditEvent, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class EngineUsageRecord(_message.Message):
    __slots__ = ("request_id", "replica_id", "tenant_id", "api_key_id", "model", "model_version", "tags", "prompt_tokens", "completion_tokens", "status", "traffic_class", "start_time", "end_time", "router_id", "trace_id")
    class TagsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    REPLICA_ID_FIELD_NUMBER: _ClassVar[int]
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    API_KEY_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    TAGS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    TRAFFIC_CLASS_FIELD_NUMBER: _ClassVar[int]
    START_TIME_FIELD_NUMBER: _ClassVar[int]
    END_TIME_FIELD_NUMBER: _ClassVar[int]
    ROUTER_ID_FIELD_NUMBER: _ClassVar[int]
    TRACE_ID_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    replica_id: str
    tenant_id: str
    api_key_id: str
    model: str
    model_version: str
    tags: _containers.ScalarMap[str, str]
    prompt_tokens: int
    completion_tokens: int
    status: UsageStatus
    traffic_class: _generation_pb2.TrafficClass
    start_time: _timestamp_pb2.Timestamp
    end_time: _timestamp_pb2.Timestamp
    router_id: str
    trace_id: str
    def __init__(self, request_id: _Optional[str] = ..., replica_id: _Optional[str] = ..., tenant_id: _Optional[str] = ..., api_key_id: _Optional[str] = ..., model: _Optional[str] = ..., model_version: _Optional[str] = ..., tags: _Optional[_Mapping[str, str]] = ..., prompt_tokens: _Optional[int] = ..., completion_tokens: _Optional[int] = ..., status: _Optional[_Union[UsageStatus, str]] = ..., traffic_class: _Optional[_Union[_generation_pb2.TrafficClass, str]] = ..., start_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., end_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., router_id: _Optional[str] = ..., trace_id: _Optional[str] = ...) -> None: ...

class ReportEngineUsageRequest(_message.Message):
    __slots__ = ("records",)
    RECORDS_FIELD_NUMBER: _ClassVar[int]
    records: _containers.RepeatedCompositeFieldContainer[EngineUsageRecord]
    def __init__(self, records: _Optional[_Iterable[_Union[EngineUsageRecord, _Mapping]]] = ...) -> None: ...

class EngineUsageRejection(_message.Message):
    __slots__ = ("index", "error_code", "error_message")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    ERROR_CODE_FIELD_NUMBER: _ClassVar[int]
    ERROR_MESSAGE_FIELD_NUMBER: _ClassVar[int]
    index: int
    error_code: str
    error_message: str
    def __init__(self, index: _Optional[int] = ..., error_code: _Optional[str] = ..., error_message: _Optional[str] = ...) -> None: ...

class ReportEngineUsageResponse(_message.Message):
    __slots__ = ("accepted", "rejections")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    REJECTIONS_FIELD_NUMBER: _ClassVar[int]
    accepted: int
    rejections: _containers.RepeatedCompositeFieldContainer[EngineUsageRejection]
    def __init__(self, accepted: _Optional[int] = ..., rejections: _Optional[_Iterable[_Union[EngineUsageRejection, _Mapping]]] = ...) -> None: ...

class WatchLeasesRequest(_message.Message):
    __slots__ = ("router_id",)
    ROUTER_ID_FIELD_NUMBER: _ClassVar[int]
    router_id: str
    def __init__(self, router_id: _Optional[str] = ...) -> None: ...

class WatchLeasesResponse(_message.Message):
    __slots__ = ("revision", "scope", "budget_id", "ack_wanted", "prices_changed")
    REVISION_FIELD_NUMBER: _ClassVar[int]
    SCOPE_FIELD_NUMBER: _ClassVar[int]
    BUDGET_ID_FIELD_NUMBER: _ClassVar[int]
    ACK_WANTED_FIELD_NUMBER: _ClassVar[int]
    PRICES_CHANGED_FIELD_NUMBER: _ClassVar[int]
    revision: int
    scope: BudgetScope
    budget_id: str
    ack_wanted: bool
    prices_changed: bool
    def __init__(self, revision: _Optional[int] = ..., scope: _Optional[_Union[BudgetScope, _Mapping]] = ..., budget_id: _Optional[str] = ..., ack_wanted: _Optional[bool] = ..., prices_changed: _Optional[bool] = ...) -> None: ...

class AckLeaseChangeRequest(_message.Message):
    __slots__ = ("router_id", "revision", "consumed")
    ROUTER_ID_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    CONSUMED_FIELD_NUMBER: _ClassVar[int]
    router_id: str
    revision: int
    consumed: _containers.RepeatedCompositeFieldContainer[LeaseConsumption]
    def __init__(self, router_id: _Optional[str] = ..., revision: _Optional[int] = ..., consumed: _Optional[_Iterable[_Union[LeaseConsumption, _Mapping]]] = ...) -> None: ...

class AckLeaseChangeResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...
