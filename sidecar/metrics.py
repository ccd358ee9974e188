"""Prometheus metrics of one sidecar (its own registry, served on a loopback port)."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from sidecar.breaker import BreakerState

BREAKER_VALUE = {BreakerState.CLOSED: 0, BreakerState.HALF_OPEN: 1, BreakerState.OPEN: 2}


class SidecarMetrics:
    def __init__(self, service: str) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("sidecar_requests", "Proxied calls by direction, method and final status",
                                ["direction", "method", "code"], registry=self.registry)
        self.latency = Histogram("sidecar_request_duration_seconds", "Proxied call duration",
                                 ["direction", "method"], registry=self.registry,
                                 buckets=(.0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30))
        self.retries = Counter("sidecar_retries", "Retries started, by cluster", ["cluster"], registry=self.registry)
        self.retry_denied = Counter("sidecar_retry_budget_exhausted", "Retries refused by the retry budget",
                                    ["cluster"], registry=self.registry)
        self.breaker_state = Gauge("sidecar_circuit_breaker_state", "0 closed, 1 half-open, 2 open",
                                   ["cluster"], registry=self.registry)
        self.ejections = Counter("sidecar_outlier_ejections", "Endpoints ejected by outlier detection",
                                 ["cluster", "endpoint"], registry=self.registry)
        self.denied = Counter("sidecar_authz_denied", "Calls refused by authorization", ["peer", "method"], registry=self.registry)
        self.handshake_failures = Counter("sidecar_tls_handshake_failures", "TLS handshakes grpc refused, by reason",
                                          ["reason"], registry=self.registry)
        self.service = service
        self._server: Any = None

    def breaker_changed(self, cluster: str, state: BreakerState) -> None:
        self.breaker_state.labels(cluster).set(BREAKER_VALUE[state])

    def serve(self, port: int) -> int:
        """Serve /metrics on 127.0.0.1:port (0 = any free port); returns the bound port."""
        server, _thread = start_http_server(port, addr="127.0.0.1", registry=self.registry)
        self._server = server
        return int(server.server_port)

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
