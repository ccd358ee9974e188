import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class VersionState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    VERSION_STATE_UNSPECIFIED: _ClassVar[VersionState]
    VERSION_STATE_DRAFT: _ClassVar[VersionState]
    VERSION_STATE_PENDING_APPROVAL: _ClassVar[VersionState]
    VERSION_STATE_ACTIVE: _ClassVar[VersionState]
    VERSION_STATE_DEPRECATED: _ClassVar[VersionState]
    VERSION_STATE_RETIRED: _ClassVar[VersionState]
VERSION_STATE_UNSPECIFIED: VersionState
VERSION_STATE_DRAFT: VersionState
VERSION_STATE_PENDING_APPROVAL: VersionState
VERSION_STATE_ACTIVE: VersionState
VERSION_STATE_DEPRECATED: VersionState
VERSION_STATE_RETIRED: VersionState

class VersionStateChange(_message.Message):
    __slots__ = ("time", "from_state", "to_state", "operator", "reason")
    TIME_FIELD_NUMBER: _ClassVar[int]
    FROM_STATE_FIELD_NUMBER: _ClassVar[int]
    TO_STATE_FIELD_NUMBER: _ClassVar[int]
    OPERATOR_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    time: _timestamp_pb2.Timestamp
    from_state: VersionState
    to_state: VersionState
    operator: str
    reason: str
    def __init__(self, time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., from_state: _Optional[_Union[VersionState, str]] = ..., to_state: _Optional[_Union[VersionState, str]] = ..., operator: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...
