"""Assemble one sidecar: inbound (mTLS) and outbound (plaintext, loopback) listeners, the admin RPC,
metrics, and the watcher that reloads the policy and the certificates when their files change."""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import grpc
import structlog

from autoglm.sidecar.v1 import sidecar_admin_service_pb2_grpc as admin_grpc
from sidecar.access_log import FLUSH_INTERVAL_S, AccessLog
from sidecar.admin import SidecarAdminServicer
from sidecar.breaker import BreakerState
from sidecar.certs import CertFiles
from sidecar.metrics import SidecarMetrics
from sidecar.peer_tls import PeerConnector
from sidecar.policy import Policy, PolicyError, PolicyWatcher
from sidecar.proxy import Proxy
from sidecar.tcp_balancer import TcpBalancer
from sidecar.upstream import CHANNEL_OPTIONS, Cluster

log = structlog.get_logger("sidecar")

SERVER_OPTIONS: tuple[tuple[str, Any], ...] = (
    ("grpc.max_receive_message_length", 8 * 1024 * 1024),
    ("grpc.max_send_message_length", 8 * 1024 * 1024),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
)


@dataclass(frozen=True)
class SidecarConfig:
    policy_path: Path
    service: str
    certs_dir: Path
    upstream: str  # the local service, host:port or unix:/path; several copies comma-separated
    peers: Mapping[str, Sequence[str]] = field(default_factory=dict)  # service → its sidecars' inbound addresses
    host: str = "127.0.0.1"
    inbound_port: int = 0
    outbound_port: int | None = 0  # None: no outbound listener
    admin_port: int = 0
    metrics_port: int | None = 0  # None: no metrics endpoint
    access_log: bool = True
    watch_interval_s: float = 1.0
    # Where access-log lines go: None = through structlog; a text stream = the cheap buffered sink.
    access_log_stream: IO[str] | None = field(default=None, compare=False)
    # TLS-passthrough TCP listeners: port → the backends it balances (least connections), e.g. the
    # routers' own HTTPS ports behind one public port (see sidecar.tcp_balancer).
    tcp_balance: Mapping[int, Sequence[str]] = field(default_factory=dict)
    # How often a local service run as several copies is health-checked (see Cluster.least_request).
    health_interval_s: float = 0.5

    @property
    def upstreams(self) -> list[str]:
        return [a.strip() for a in self.upstream.split(",") if a.strip()]


@dataclass
class RunningSidecar:
    config: SidecarConfig
    inbound_port: int
    outbound_port: int | None
    admin_port: int
    metrics_port: int | None
    inbound: Proxy
    outbound: Proxy | None
    watcher: PolicyWatcher
    certs: CertFiles
    _servers: list[grpc.aio.Server]
    _clusters: list[Cluster]
    _metrics: SidecarMetrics
    _connector: PeerConnector
    _watch_task: asyncio.Task[None] | None = None
    balancers: dict[int, TcpBalancer] = field(default_factory=dict)  # bound port → balancer
    _health_task: asyncio.Task[None] | None = None

    @property
    def inbound_address(self) -> str:
        return f"{self.config.host}:{self.inbound_port}"

    @property
    def outbound_address(self) -> str:
        return f"{self.config.host}:{self.outbound_port}"

    @property
    def admin_address(self) -> str:
        return f"{self.config.host}:{self.admin_port}"

    def ports(self) -> dict[str, Any]:
        ports: dict[str, Any] = {"inbound": self.inbound_port, "outbound": self.outbound_port,
                                 "admin": self.admin_port, "metrics": self.metrics_port}
        if self.balancers:
            ports["tcp_balance"] = sorted(self.balancers)
        return ports

    def check_files(self) -> None:
        """Reload the policy and the client certificates if their files changed."""
        self.watcher.check()
        before = self.certs.version
        try:
            self.certs.refresh()
        except (OSError, ValueError) as exc:
            log.error("certificate_reload_failed", error=str(exc))
            return
        if self.certs.version != before or self._client_version != self.certs.version:
            # New channels (so new TLS connections, with the new certificate) for new calls; calls in
            # flight finish on the old ones.
            self._client_version = self.certs.version
            for cluster in self._clusters:
                if cluster.name != "local":
                    cluster.rebuild_channels(_peer_channels(self._connector, self.watcher.policy, cluster.name))
            log.info("certificates_reloaded", identity=self.certs.identity)

    _client_version: int = 0

    async def _watch(self) -> None:
        next_check = 0.0
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(min(self.config.watch_interval_s, FLUSH_INTERVAL_S))
            self.flush_access_logs()
            if loop.time() >= next_check:
                next_check = loop.time() + self.config.watch_interval_s
                self.check_files()

    def count_refused_handshake(self, reason: str) -> None:
        self._metrics.handshake_failures.labels(reason).inc()

    def flush_access_logs(self) -> None:
        for proxy in (self.inbound, self.outbound):
            if proxy is not None:
                proxy.access_log.flush()

    async def stop(self, grace: float = 5.0) -> None:
        for task in (self._watch_task, self._health_task):
            if task:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        await asyncio.gather(*(balancer.stop() for balancer in self.balancers.values()))
        await asyncio.gather(*(server.stop(grace) for server in self._servers))
        self.flush_access_logs()
        for cluster in self._clusters:
            await cluster.close()
        await self._connector.close()
        self._metrics.stop()
        log.info("sidecar_stopped", service=self.config.service)


def _server_credentials(certs: CertFiles, require_client_cert: bool) -> grpc.ServerCredentials:
    def configuration() -> Any:
        return grpc.ssl_server_certificate_configuration(
            [(certs.pair.key_pem, certs.pair.cert_pem)], root_certificates=certs.ca_pem)

    served = {"version": certs.version}

    def fetch() -> Any:
        # Called by grpc before every new handshake: new files are used for new connections only.
        try:
            certs.refresh()
        except (OSError, ValueError) as exc:
            log.error("certificate_reload_failed", error=str(exc))
            return None
        if certs.version == served["version"]:
            return None
        served["version"] = certs.version
        return configuration()

    return grpc.dynamic_ssl_server_credentials(configuration(), fetch,
                                               require_client_authentication=require_client_cert)


def _peer_channels(connector: PeerConnector, policy: Policy, peer: str) -> Callable[[str], grpc.aio.Channel]:
    """Channels to `peer`'s endpoints over mTLS that accept only `peer`'s SPIFFE id (see sidecar.peer_tls)."""
    return functools.partial(connector.channel, peer=peer, identity=policy.spiffe_id(peer))


def _local_channel(address: str) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(address, options=list(CHANNEL_OPTIONS))


async def build_sidecar(config: SidecarConfig) -> RunningSidecar:
    proxies: list[Proxy] = []

    def on_change(new: Policy) -> None:
        for proxy in proxies:
            proxy.set_policy(new)
        log.info("policy_reloaded", sha256=new.sha256)

    watcher = PolicyWatcher(config.policy_path, on_change=on_change,
                            on_error=lambda exc: log.error("policy_reload_rejected", error=str(exc)))
    policy: Policy = watcher.policy
    if config.service not in policy.services:
        raise PolicyError(f"{config.policy_path}: services: no entry for {config.service!r} "
                          f"(known: {', '.join(policy.services)})")
    certs = CertFiles(config.certs_dir, config.service)
    expected = policy.spiffe_id(config.service)
    if certs.identity != expected:
        raise PolicyError(f"{config.certs_dir / (config.service + '.pem')}: identity {certs.identity!r} is not "
                          f"{expected!r}; reissue it with `autoglm certs issue {config.service}`")
    metrics = SidecarMetrics(config.service)
    local = Cluster("local", config.upstreams, _local_channel, policy.services[config.service], resilience=False,
                    least_request=True)
    clusters = [local]
    connector = PeerConnector(certs, CHANNEL_OPTIONS)
    peers: dict[str, Cluster] = {}
    for name, addresses in config.peers.items():
        if name not in policy.services:
            raise PolicyError(f"--peer {name}: not a service of the mesh policy ({', '.join(policy.services)})")
        peers[name] = Cluster(name, list(addresses), _peer_channels(connector, policy, name),
                              policy.services[name], resilience=True, on_breaker_change=metrics.breaker_changed)
        metrics.breaker_changed(name, BreakerState.CLOSED)  # every peer's breaker has a series from the start
        clusters.append(peers[name])

    inbound = Proxy(direction="inbound", service=config.service, policy=policy, clusters={"local": local},
                    metrics=metrics,
                    access_log=AccessLog(config.service, "inbound", config.access_log, config.access_log_stream))
    servers: list[grpc.aio.Server] = []
    in_server = grpc.aio.server(handlers=[inbound], options=list(SERVER_OPTIONS))
    public = policy.services[config.service].public
    inbound_port = in_server.add_secure_port(f"{config.host}:{config.inbound_port}",
                                             _server_credentials(certs, require_client_cert=not public))
    servers.append(in_server)

    outbound: Proxy | None = None
    outbound_port: int | None = None
    if config.outbound_port is not None:
        outbound = Proxy(direction="outbound", service=config.service, policy=policy, clusters=peers,
                         metrics=metrics,
                         access_log=AccessLog(config.service, "outbound", config.access_log, config.access_log_stream))
        out_server = grpc.aio.server(handlers=[outbound], options=list(SERVER_OPTIONS))
        outbound_port = out_server.add_insecure_port(f"{config.host}:{config.outbound_port}")
        servers.append(out_server)

    proxies.extend(p for p in (inbound, outbound) if p is not None)
    admin_server = grpc.aio.server(options=list(SERVER_OPTIONS))
    admin_grpc.add_SidecarAdminServiceServicer_to_server(
        SidecarAdminServicer(watcher, lambda: [*peers.values(), local], lambda: certs.identity), admin_server)
    admin_port = admin_server.add_insecure_port(f"127.0.0.1:{config.admin_port}")
    servers.append(admin_server)
    for server in servers:
        await server.start()
    balancers: dict[int, TcpBalancer] = {}
    for port, backends in config.tcp_balance.items():
        balancer = TcpBalancer(backends)
        balancers[await balancer.start(config.host, port)] = balancer
    metrics_port = metrics.serve(config.metrics_port) if config.metrics_port is not None else None
    running = RunningSidecar(config=config, inbound_port=inbound_port, outbound_port=outbound_port,
                             admin_port=admin_port, metrics_port=metrics_port, inbound=inbound, outbound=outbound,
                             watcher=watcher, certs=certs, _servers=servers, _clusters=clusters, _metrics=metrics,
                             _connector=connector, balancers=balancers)
    running._client_version = certs.version
    if local.least_request:
        running._health_task = asyncio.get_running_loop().create_task(
            local.check_health_forever(config.health_interval_s))
    running._watch_task = asyncio.get_running_loop().create_task(running._watch())
    log.info("sidecar_started", service=config.service, identity=certs.identity, **running.ports())
    return running
