import datetime

from autoglm.common.v1 import generation_pb2 as _generation_pb2
from autoglm.router.v1 import model_lifecycle_pb2 as _model_lifecycle_pb2
from google.protobuf import duration_pb2 as _duration_pb2
from google.protobuf import struct_pb2 as _struct_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class KeyLimits(_message.Message):
    __slots__ = ("requests_per_minute", "tokens_per_minute")
    REQUESTS_PER_MINUTE_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_MINUTE_FIELD_NUMBER: _ClassVar[int]
    requests_per_minute: int
    tokens_per_minute: int
    def __init__(self, requests_per_minute: _Optional[int] = ..., tokens_per_minute: _Optional[int] = ...) -> None: ...

class ApiKey(_message.Message):
    __slots__ = ("key_id", "prefix", "tenant_id", "name", "allowed_models", "limits", "traffic_class", "create_time", "revoke_time", "expire_time")
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    PREFIX_FIELD_NUMBER: _ClassVar[int]
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    ALLOWED_MODELS_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    TRAFFIC_CLASS_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    REVOKE_TIME_FIELD_NUMBER: _ClassVar[int]
    EXPIRE_TIME_FIELD_NUMBER: _ClassVar[int]
    key_id: str
    prefix: str
    tenant_id: str
    name: str
    allowed_models: _containers.RepeatedScalarFieldContainer[str]
    limits: KeyLimits
    traffic_class: _generation_pb2.TrafficClass
    create_time: _timestamp_pb2.Timestamp
    revoke_time: _timestamp_pb2.Timestamp
    expire_time: _timestamp_pb2.Timestamp
    def __init__(self, key_id: _Optional[str] = ..., prefix: _Optional[str] = ..., tenant_id: _Optional[str] = ..., name: _Optional[str] = ..., allowed_models: _Optional[_Iterable[str]] = ..., limits: _Optional[_Union[KeyLimits, _Mapping]] = ..., traffic_class: _Optional[_Union[_generation_pb2.TrafficClass, str]] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., revoke_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., expire_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class CreateApiKeyRequest(_message.Message):
    __slots__ = ("tenant_id", "name", "allowed_models", "limits", "traffic_class", "expire_time")
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    ALLOWED_MODELS_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    TRAFFIC_CLASS_FIELD_NUMBER: _ClassVar[int]
    EXPIRE_TIME_FIELD_NUMBER: _ClassVar[int]
    tenant_id: str
    name: str
    allowed_models: _containers.RepeatedScalarFieldContainer[str]
    limits: KeyLimits
    traffic_class: _generation_pb2.TrafficClass
    expire_time: _timestamp_pb2.Timestamp
    def __init__(self, tenant_id: _Optional[str] = ..., name: _Optional[str] = ..., allowed_models: _Optional[_Iterable[str]] = ..., limits: _Optional[_Union[KeyLimits, _Mapping]] = ..., traffic_class: _Optional[_Union[_generation_pb2.TrafficClass, str]] = ..., expire_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class CreateApiKeyResponse(_message.Message):
    __slots__ = ("api_key", "secret")
    API_KEY_FIELD_NUMBER: _ClassVar[int]
    SECRET_FIELD_NUMBER: _ClassVar[int]
    api_key: ApiKey
    secret: str
    def __init__(self, api_key: _Optional[_Union[ApiKey, _Mapping]] = ..., secret: _Optional[str] = ...) -> None: ...

class ListApiKeysRequest(_message.Message):
    __slots__ = ("tenant_id", "include_revoked")
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_REVOKED_FIELD_NUMBER: _ClassVar[int]
    tenant_id: str
    include_revoked: bool
    def __init__(self, tenant_id: _Optional[str] = ..., include_revoked: _Optional[bool] = ...) -> None: ...

class ListApiKeysResponse(_message.Message):
    __slots__ = ("api_keys",)
    API_KEYS_FIELD_NUMBER: _ClassVar[int]
    api_keys: _containers.RepeatedCompositeFieldContainer[ApiKey]
    def __init__(self, api_keys: _Optional[_Iterable[_Union[ApiKey, _Mapping]]] = ...) -> None: ...

class RevokeApiKeyRequest(_message.Message):
    __slots__ = ("key_id",)
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    key_id: str
    def __init__(self, key_id: _Optional[str] = ...) -> None: ...

class RevokeApiKeyResponse(_message.Message):
    __slots__ = ("api_key",)
    API_KEY_FIELD_NUMBER: _ClassVar[int]
    api_key: ApiKey
    def __init__(self, api_key: _Optional[_Union[ApiKey, _Mapping]] = ...) -> None: ...

class Replica(_message.Message):
    __slots__ = ("address",)
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    address: str
    def __init__(self, address: _Optional[str] = ...) -> None: ...

class CanaryPolicy(_message.Message):
    __slots__ = ("max_error_permille", "max_p99_latency", "window", "min_requests")
    MAX_ERROR_PERMILLE_FIELD_NUMBER: _ClassVar[int]
    MAX_P99_LATENCY_FIELD_NUMBER: _ClassVar[int]
    WINDOW_FIELD_NUMBER: _ClassVar[int]
    MIN_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    max_error_permille: int
    max_p99_latency: _duration_pb2.Duration
    window: _duration_pb2.Duration
    min_requests: int
    def __init__(self, max_error_permille: _Optional[int] = ..., max_p99_latency: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., window: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., min_requests: _Optional[int] = ...) -> None: ...

class RegisterModelVersionRequest(_message.Message):
    __slots__ = ("model", "version", "replicas", "fallback_models", "canary_policy", "default_sampling", "initial_state")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    FALLBACK_MODELS_FIELD_NUMBER: _ClassVar[int]
    CANARY_POLICY_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_SAMPLING_FIELD_NUMBER: _ClassVar[int]
    INITIAL_STATE_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: str
    replicas: _containers.RepeatedCompositeFieldContainer[Replica]
    fallback_models: _containers.RepeatedScalarFieldContainer[str]
    canary_policy: CanaryPolicy
    default_sampling: _generation_pb2.SamplingParams
    initial_state: _model_lifecycle_pb2.VersionState
    def __init__(self, model: _Optional[str] = ..., version: _Optional[str] = ..., replicas: _Optional[_Iterable[_Union[Replica, _Mapping]]] = ..., fallback_models: _Optional[_Iterable[str]] = ..., canary_policy: _Optional[_Union[CanaryPolicy, _Mapping]] = ..., default_sampling: _Optional[_Union[_generation_pb2.SamplingParams, _Mapping]] = ..., initial_state: _Optional[_Union[_model_lifecycle_pb2.VersionState, str]] = ...) -> None: ...

class RegisterModelVersionResponse(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: ModelRecord
    def __init__(self, model: _Optional[_Union[ModelRecord, _Mapping]] = ...) -> None: ...

class VersionWeight(_message.Message):
    __slots__ = ("version", "weight_permille")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_PERMILLE_FIELD_NUMBER: _ClassVar[int]
    version: str
    weight_permille: int
    def __init__(self, version: _Optional[str] = ..., weight_permille: _Optional[int] = ...) -> None: ...

class SetTrafficSplitRequest(_message.Message):
    __slots__ = ("model", "weights")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    model: str
    weights: _containers.RepeatedCompositeFieldContainer[VersionWeight]
    def __init__(self, model: _Optional[str] = ..., weights: _Optional[_Iterable[_Union[VersionWeight, _Mapping]]] = ...) -> None: ...

class SetTrafficSplitResponse(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: ModelRecord
    def __init__(self, model: _Optional[_Union[ModelRecord, _Mapping]] = ...) -> None: ...

class PromoteVersionRequest(_message.Message):
    __slots__ = ("model", "version")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: str
    def __init__(self, model: _Optional[str] = ..., version: _Optional[str] = ...) -> None: ...

class PromoteVersionResponse(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: ModelRecord
    def __init__(self, model: _Optional[_Union[ModelRecord, _Mapping]] = ...) -> None: ...

class RollbackVersionRequest(_message.Message):
    __slots__ = ("model", "reason")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    model: str
    reason: str
    def __init__(self, model: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class RollbackVersionResponse(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: ModelRecord
    def __init__(self, model: _Optional[_Union[ModelRecord, _Mapping]] = ...) -> None: ...

class GetModelRequest(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: str
    def __init__(self, model: _Optional[str] = ...) -> None: ...

class GetModelResponse(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: ModelRecord
    def __init__(self, model: _Optional[_Union[ModelRecord, _Mapping]] = ...) -> None: ...

class VersionRecord(_message.Message):
    __slots__ = ("version", "replicas", "weight_permille", "healthy_replicas", "canary_policy", "stable", "default_sampling", "state", "history")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_PERMILLE_FIELD_NUMBER: _ClassVar[int]
    HEALTHY_REPLICAS_FIELD_NUMBER: _ClassVar[int]
    CANARY_POLICY_FIELD_NUMBER: _ClassVar[int]
    STABLE_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_SAMPLING_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    HISTORY_FIELD_NUMBER: _ClassVar[int]
    version: str
    replicas: _containers.RepeatedCompositeFieldContainer[Replica]
    weight_permille: int
    healthy_replicas: int
    canary_policy: CanaryPolicy
    stable: bool
    default_sampling: _generation_pb2.SamplingParams
    state: _model_lifecycle_pb2.VersionState
    history: _containers.RepeatedCompositeFieldContainer[_model_lifecycle_pb2.VersionStateChange]
    def __init__(self, version: _Optional[str] = ..., replicas: _Optional[_Iterable[_Union[Replica, _Mapping]]] = ..., weight_permille: _Optional[int] = ..., healthy_replicas: _Optional[int] = ..., canary_policy: _Optional[_Union[CanaryPolicy, _Mapping]] = ..., stable: _Optional[bool] = ..., default_sampling: _Optional[_Union[_generation_pb2.SamplingParams, _Mapping]] = ..., state: _Optional[_Union[_model_lifecycle_pb2.VersionState, str]] = ..., history: _Optional[_Iterable[_Union[_model_lifecycle_pb2.VersionStateChange, _Mapping]]] = ...) -> None: ...

class ModelRecord(_message.Message):
    __slots__ = ("name", "versions", "fallback_models", "context_window")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    FALLBACK_MODELS_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_WINDOW_FIELD_NUMBER: _ClassVar[int]
    name: str
    versions: _containers.RepeatedCompositeFieldContainer[VersionRecord]
    fallback_models: _containers.RepeatedScalarFieldContainer[str]
    context_window: int
    def __init__(self, name: _Optional[str] = ..., versions: _Optional[_Iterable[_Union[VersionRecord, _Mapping]]] = ..., fallback_models: _Optional[_Iterable[str]] = ..., context_window: _Optional[int] = ...) -> None: ...

class Policy(_message.Message):
    __slots__ = ("blocked_terms", "max_prompt_tokens", "max_tokens_cap", "normalize_cache_keys", "name", "shared_cache_models")
    BLOCKED_TERMS_FIELD_NUMBER: _ClassVar[int]
    MAX_PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_CAP_FIELD_NUMBER: _ClassVar[int]
    NORMALIZE_CACHE_KEYS_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    SHARED_CACHE_MODELS_FIELD_NUMBER: _ClassVar[int]
    blocked_terms: _containers.RepeatedScalarFieldContainer[str]
    max_prompt_tokens: int
    max_tokens_cap: int
    normalize_cache_keys: bool
    name: str
    shared_cache_models: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, blocked_terms: _Optional[_Iterable[str]] = ..., max_prompt_tokens: _Optional[int] = ..., max_tokens_cap: _Optional[int] = ..., normalize_cache_keys: _Optional[bool] = ..., name: _Optional[str] = ..., shared_cache_models: _Optional[_Iterable[str]] = ...) -> None: ...

class SetPolicyRequest(_message.Message):
    __slots__ = ("tenant_id", "policy")
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    tenant_id: str
    policy: Policy
    def __init__(self, tenant_id: _Optional[str] = ..., policy: _Optional[_Union[Policy, _Mapping]] = ...) -> None: ...

class SetPolicyResponse(_message.Message):
    __slots__ = ("policy",)
    POLICY_FIELD_NUMBER: _ClassVar[int]
    policy: Policy
    def __init__(self, policy: _Optional[_Union[Policy, _Mapping]] = ...) -> None: ...

class GetPolicyRequest(_message.Message):
    __slots__ = ("tenant_id",)
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    tenant_id: str
    def __init__(self, tenant_id: _Optional[str] = ...) -> None: ...

class GetPolicyResponse(_message.Message):
    __slots__ = ("policy",)
    POLICY_FIELD_NUMBER: _ClassVar[int]
    policy: Policy
    def __init__(self, policy: _Optional[_Union[Policy, _Mapping]] = ...) -> None: ...

class ListAuditEventsRequest(_message.Message):
    __slots__ = ("action", "page_size", "page_token")
    ACTION_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    action: str
    page_size: int
    page_token: str
    def __init__(self, action: _Optional[str] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class AuditEvent(_message.Message):
    __slots__ = ("sequence", "time", "actor", "action", "target", "details")
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    ACTOR_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    DETAILS_FIELD_NUMBER: _ClassVar[int]
    sequence: int
    time: _timestamp_pb2.Timestamp
    actor: str
    action: str
    target: str
    details: _struct_pb2.Struct
    def __init__(self, sequence: _Optional[int] = ..., time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., actor: _Optional[str] = ..., action: _Optional[str] = ..., target: _Optional[str] = ..., details: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ...) -> None: ...

class ListAuditEventsResponse(_message.Message):
    __slots__ = ("events", "next_page_token")
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    events: _containers.RepeatedCompositeFieldContainer[AuditEvent]
    next_page_token: str
    def __init__(self, events: _Optional[_Iterable[_Union[AuditEvent, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class SetVersionStateRequest(_message.Message):
    __slots__ = ("model", "version", "state", "operator", "reason")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    OPERATOR_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: str
    state: _model_lifecycle_pb2.VersionState
    operator: str
    reason: str
    def __init__(self, model: _Optional[str] = ..., version: _Optional[str] = ..., state: _Optional[_Union[_model_lifecycle_pb2.VersionState, str]] = ..., operator: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class SetVersionStateResponse(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: ModelRecord
    def __init__(self, model: _Optional[_Union[ModelRecord, _Mapping]] = ...) -> None: ...
