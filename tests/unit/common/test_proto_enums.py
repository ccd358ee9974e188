"""Each enum the services share is defined once in services/common with the values of the proto enum it maps
to: every member has a proto value of the same number and every proto value a member, so a value added to a
proto (or to the Python enum) without its counterpart fails here instead of drifting at run time."""

from __future__ import annotations

from enum import IntEnum

import pytest
from google.protobuf.internal.enum_type_wrapper import EnumTypeWrapper

from autoglm.billing.v1 import billing_service_pb2
from autoglm.common.v1 import generation_pb2
from services.common.generation import FinishReason, Role, TrafficClass
from services.common.usage import AlertLevel, UsageStatus

# (shared enum, proto enum, the proto's prefix, member names that differ from the proto's)
SHARED = [
    (Role, generation_pb2.ChatRole, "CHAT_ROLE_", {}),
    (TrafficClass, generation_pb2.TrafficClass, "TRAFFIC_CLASS_", {}),
    (FinishReason, generation_pb2.FinishReason, "FINISH_REASON_", {}),
    (UsageStatus, billing_service_pb2.UsageStatus, "USAGE_STATUS_", {}),
    (AlertLevel, billing_service_pb2.AlertLevel, "ALERT_LEVEL_", {"NONE": "UNSPECIFIED"}),  # below every threshold
]


@pytest.mark.parametrize(("shared", "proto", "prefix", "renamed"), SHARED, ids=[s[0].__name__ for s in SHARED])
def test_a_shared_enum_and_its_proto_enum_have_the_same_members_and_values(
        shared: type[IntEnum], proto: EnumTypeWrapper, prefix: str, renamed: dict[str, str]) -> None:
    ours = {prefix + renamed.get(member.name, member.name): int(member) for member in shared}
    theirs = dict(proto.items())
    assert ours == theirs
    assert len(shared.__members__) == len(shared)  # no aliases hiding a second name for a value


def test_no_service_defines_its_own_copy_of_a_shared_type() -> None:
    from services.billing import model as billing_model
    from services.inference.engine import types as engine_types
    from services.router import ports as router_ports
    from services.router import types as router_types

    shared = {"TrafficClass", "FinishReason", "Usage", "UsageStatus", "AlertLevel", "Status", "Level"}
    for module in (router_types, router_ports, engine_types, billing_model):
        own = {name for name, value in vars(module).items()
               if isinstance(value, type) and value.__module__ == module.__name__}
        assert not own & shared, (module.__name__, own & shared)


def test_the_cli_names_each_traffic_class_with_its_proto_value() -> None:
    from services.cli.admin_commands import _CLASSES

    assert _CLASSES == {c.name.lower(): int(c) for c in TrafficClass if c != TrafficClass.UNSPECIFIED}
