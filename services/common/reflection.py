"""Server reflection that also serves the protos' comments.

Generated `_pb2` modules embed descriptors without source info, so stock reflection gives grpcurl
`describe` no comments. `make gen` also writes `gen/autoglm/descriptor_set.binpb` (built with
`--include_source_info`); this servicer answers file requests with those richer descriptors.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import descriptor_pb2
from grpc_reflection.v1alpha import _async as reflection_aio
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc

import autoglm

DESCRIPTOR_SET = Path(autoglm.__file__).parent / "descriptor_set.binpb"


@cache
def documented_files() -> dict[str, bytes]:
    """Serialized FileDescriptorProtos with source info, by file name ({} if the set is missing)."""
    if not DESCRIPTOR_SET.exists():
        return {}
    files = descriptor_pb2.FileDescriptorSet.FromString(DESCRIPTOR_SET.read_bytes())
    return {f.name: f.SerializeToString() for f in files.file}


def _collect(descriptor: Any, seen: dict[str, Any]) -> None:
    seen[descriptor.name] = descriptor
    for dependency in descriptor.dependencies:
        if dependency.name not in seen:
            _collect(dependency, seen)


class DocumentedReflectionServicer(reflection_aio.ReflectionServicer):
    def _respond(self, descriptor: Any, request: Any) -> reflection_pb2.ServerReflectionResponse:
        seen: dict[str, Any] = {}
        _collect(descriptor, seen)
        documented = documented_files()
        serialized = []
        for name, file_descriptor in seen.items():
            if name in documented:
                serialized.append(documented[name])
            else:
                proto = descriptor_pb2.FileDescriptorProto()
                file_descriptor.CopyToProto(proto)
                serialized.append(proto.SerializeToString())
        return reflection_pb2.ServerReflectionResponse(
            file_descriptor_response=reflection_pb2.FileDescriptorResponse(file_descriptor_proto=serialized),
            original_request=request,
        )

    def _file_by_filename(self, request: Any, filename: str) -> Any:
        try:
            return self._respond(self._pool.FindFileByName(filename), request)
        except KeyError:
            return super()._file_by_filename(request, filename)

    def _file_containing_symbol(self, request: Any, fully_qualified_name: str) -> Any:
        try:
            return self._respond(self._pool.FindFileContainingSymbol(fully_qualified_name), request)
        except KeyError:
            return super()._file_containing_symbol(request, fully_qualified_name)


def enable_documented_reflection(service_names: Sequence[str], server: grpc.aio.Server) -> None:
    names = [*service_names, reflection.SERVICE_NAME]
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(DocumentedReflectionServicer(names), server)
