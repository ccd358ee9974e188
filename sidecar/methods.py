"""Each known method's call type, read from the generated descriptors in `gen/` (and the standard
health and reflection services), so unary calls take the fast unary path."""

from __future__ import annotations

from enum import Enum
from functools import cache

from google.protobuf.descriptor import FileDescriptor


class CallType(Enum):
    UNARY_UNARY = "unary_unary"
    UNARY_STREAM = "unary_stream"
    STREAM_UNARY = "stream_unary"
    STREAM_STREAM = "stream_stream"

    @property
    def streams_requests(self) -> bool:
        return self in (CallType.STREAM_UNARY, CallType.STREAM_STREAM)

    @property
    def streams_responses(self) -> bool:
        return self in (CallType.UNARY_STREAM, CallType.STREAM_STREAM)


def _descriptors() -> list[FileDescriptor]:
    from grpc_health.v1 import health_pb2
    from grpc_reflection.v1alpha import reflection_pb2

    from autoglm.billing.v1 import billing_service_pb2
    from autoglm.inference.v1 import inference_service_pb2
    from autoglm.router.v1 import admin_service_pb2, router_service_pb2
    from autoglm.sidecar.v1 import sidecar_admin_service_pb2

    return [m.DESCRIPTOR for m in (billing_service_pb2, inference_service_pb2, admin_service_pb2,
                                   router_service_pb2, sidecar_admin_service_pb2, health_pb2, reflection_pb2)]


@cache
def method_table() -> dict[str, CallType]:
    """`/pkg.Service/Method` → call type for every method of every known service."""
    table: dict[str, CallType] = {}
    for file in _descriptors():
        for service in file.services_by_name.values():
            for method in service.methods:
                kind = {
                    (False, False): CallType.UNARY_UNARY, (False, True): CallType.UNARY_STREAM,
                    (True, False): CallType.STREAM_UNARY, (True, True): CallType.STREAM_STREAM,
                }[(method.client_streaming, method.server_streaming)]
                table[f"/{service.full_name}/{method.name}"] = kind
    return table


def call_type(method: str) -> CallType:
    """Unknown methods are proxied as bidirectional streams, which carries any call type."""
    return method_table().get(method, CallType.STREAM_STREAM)
