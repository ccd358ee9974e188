"""SidecarAdminService: the policy in force and the state of every upstream endpoint (loopback only)."""

from __future__ import annotations

from collections.abc import Callable

import grpc

from autoglm.sidecar.v1 import sidecar_admin_service_pb2 as pb
from autoglm.sidecar.v1 import sidecar_admin_service_pb2_grpc as pb_grpc
from sidecar.breaker import BreakerState
from sidecar.policy import PolicyWatcher
from sidecar.upstream import Cluster

_STATE = {BreakerState.CLOSED: pb.BREAKER_STATE_CLOSED, BreakerState.OPEN: pb.BREAKER_STATE_OPEN,
          BreakerState.HALF_OPEN: pb.BREAKER_STATE_HALF_OPEN}


class SidecarAdminServicer(pb_grpc.SidecarAdminServiceServicer):
    def __init__(self, watcher: PolicyWatcher, clusters: Callable[[], list[Cluster]],
                 identity: Callable[[], str]) -> None:
        self._watcher = watcher
        self._clusters = clusters
        self._identity = identity

    async def GetConfig(self, request: pb.GetConfigRequest, context: grpc.aio.ServicerContext
                        ) -> pb.GetConfigResponse:
        policy = self._watcher.policy
        return pb.GetConfigResponse(policy_yaml=policy.source_yaml, policy_sha256=policy.sha256,
                                    loaded_at_unix_ms=int(self._watcher.loaded_at * 1000),
                                    identity=self._identity())

    async def GetUpstreams(self, request: pb.GetUpstreamsRequest, context: grpc.aio.ServicerContext
                           ) -> pb.GetUpstreamsResponse:
        reply = pb.GetUpstreamsResponse()
        for cluster in self._clusters():
            state = _STATE[cluster.breaker.state] if cluster.breaker else pb.BREAKER_STATE_CLOSED
            for index, endpoint in enumerate(cluster.endpoints):
                health = cluster.outlier.endpoints[index] if cluster.outlier else None
                reply.upstreams.append(pb.Upstream(
                    cluster=cluster.name, address=endpoint.address, breaker_state=state,
                    ejected=bool(health and cluster.outlier and cluster.outlier.ejected(health)),
                    requests_total=health.requests_total if health else 0,
                    failures_total=health.failures_total if health else 0,
                    active_requests=cluster.active))
        return reply
