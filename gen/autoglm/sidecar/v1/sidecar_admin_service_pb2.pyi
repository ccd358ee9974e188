from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class BreakerState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    BREAKER_STATE_UNSPECIFIED: _ClassVar[BreakerState]
    BREAKER_STATE_CLOSED: _ClassVar[BreakerState]
    BREAKER_STATE_OPEN: _ClassVar[BreakerState]
    BREAKER_STATE_HALF_OPEN: _ClassVar[BreakerState]
BREAKER_STATE_UNSPECIFIED: BreakerState
BREAKER_STATE_CLOSED: BreakerState
BREAKER_STATE_OPEN: BreakerState
BREAKER_STATE_HALF_OPEN: BreakerState

class GetConfigRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetConfigResponse(_message.Message):
    __slots__ = ("policy_yaml", "policy_sha256", "loaded_at_unix_ms", "identity")
    POLICY_YAML_FIELD_NUMBER: _ClassVar[int]
    POLICY_SHA256_FIELD_NUMBER: _ClassVar[int]
    LOADED_AT_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    IDENTITY_FIELD_NUMBER: _ClassVar[int]
    policy_yaml: str
    policy_sha256: str
    loaded_at_unix_ms: int
    identity: str
    def __init__(self, policy_yaml: _Optional[str] = ..., policy_sha256: _Optional[str] = ..., loaded_at_unix_ms: _Optional[int] = ..., identity: _Optional[str] = ...) -> None: ...

class GetUpstreamsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Upstream(_message.Message):
    __slots__ = ("cluster", "address", "breaker_state", "ejected", "requests_total", "failures_total", "active_requests")
    CLUSTER_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    BREAKER_STATE_FIELD_NUMBER: _ClassVar[int]
    EJECTED_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    FAILURES_TOTAL_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    cluster: str
    address: str
    breaker_state: BreakerState
    ejected: bool
    requests_total: int
    failures_total: int
    active_requests: int
    def __init__(self, cluster: _Optional[str] = ..., address: _Optional[str] = ..., breaker_state: _Optional[_Union[BreakerState, str]] = ..., ejected: _Optional[bool] = ..., requests_total: _Optional[int] = ..., failures_total: _Optional[int] = ..., active_requests: _Optional[int] = ...) -> None: ...

class GetUpstreamsResponse(_message.Message):
    __slots__ = ("upstreams",)
    UPSTREAMS_FIELD_NUMBER: _ClassVar[int]
    upstreams: _containers.RepeatedCompositeFieldContainer[Upstream]
    def __init__(self, upstreams: _Optional[_Iterable[_Union[Upstream, _Mapping]]] = ...) -> None: ...
