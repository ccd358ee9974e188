"""Which processes `autoglm up` starts, on which ports, and in which order.

Public addresses never change with the sidecar mode: the router's port from the mesh file is what
clients dial, billing's and each inference replica's ports are what peers and operators dial.

- `--sidecar none`: each service listens on its public port in plaintext.
- The router's OpenAI-compatible HTTP API (`router.http_port`): with `none` the router serves it in
  plaintext; with `python` the router serves HTTPS on it itself, with its mesh certificate (reloaded when
  the launcher renews it); with `envoy` the router's Envoy owns the port (TLS with the same certificate
  through file SDS, the bearer check, SSE streamed unbuffered) and forwards plain HTTP/1.1 to the
  router's HTTP server on a free loopback port. The Python sidecar speaks only gRPC, so it does not
  front the HTTP API: the router's own uvicorn server is the HTTPS edge in that mode.
- `--sidecar python` (default) / `envoy`: each service listens on a free loopback port; its sidecar
  owns the public port (mTLS between services; the router's public port is TLS, no client cert).
  The router reaches billing through its sidecar's outbound listener, and each inference replica
  through an outbound listener of its own, so the router still balances across replicas itself. Each
  inference replica reaches billing (ReportEngineUsage only) through its own sidecar's outbound listener
  (`inference.engine_metering`, on by default).
- `router.replicas: N` (N > 1; shared PostgreSQL and Redis, see MeshConfig): N router processes on
  loopback ports, each with outbound listeners of its own (billing, every inference replica) under the
  router's identity. The shared registry names inference replicas by their mesh addresses; each router
  dials a replica through its own listener for it (`--inference-via`). The router's public sidecar
  balances the public gRPC port across them by least outstanding requests, skipping a router whose
  health check fails. The HTTPS port: Envoy balances it
  the same way (LEAST_REQUEST); with the Python sidecar each router serves HTTPS on an internal port and
  the sidecar passes TLS connections through to the router with the fewest open ones
  (`sidecar/tcp_balancer.py`), so TLS, SSE and certificate renewal stay the router's as with one router.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from services.cli.mesh_config import MeshConfig
from services.common.ports import free_port, reserve

POLICY = Path(__file__).resolve().parents[2] / "deploy" / "policy" / "mesh-policy.yaml"


@dataclass
class ProcessSpec:
    name: str
    argv: list[str]
    # Where readiness is checked, and how: "grpc" = standard health over plaintext, "tcp" = accepts.
    ready_address: str
    ready_kind: str = "grpc"
    public_address: str = ""
    # Prometheus endpoint of the process ("" when metrics are off).
    metrics_url: str = ""


@dataclass
class Topology:
    sidecar: str
    specs: list[ProcessSpec] = field(default_factory=list)
    router_public: str = ""
    tls: bool = False
    ca_cert: Path | None = None
    # The OpenAI-compatible HTTP API's base URL ("" when router.http_port is 0).
    openai_base_url: str = ""
    # Each router process, reached directly (behind the edge): {name, grpc, http}.
    routers: list[dict[str, str]] = field(default_factory=list)


def _service(module: str, port: int, config: Path | None, metrics_port: int, *extra: str) -> list[str]:
    argv = [sys.executable, "-m", module, "--port", str(port)]
    if metrics_port:
        argv += ["--metrics-port", str(metrics_port)]
    if config:
        argv += ["--config", str(config)]
    return [*argv, *extra]


def _envoy_sidecar(name: str, service: str, certs: Path, upstream: str, inbound: int, outbound: int,
                   peers: dict[str, list[str]], out_dir: Path, admin: int, http: tuple[int, list[str]] | None = None
                   ) -> list[str]:
    """`upstream`: the service's address(es), comma-separated; `http`: (public HTTPS port, the service's
    plain HTTP addresses) when this Envoy fronts an HTTP API."""
    from sidecar.envoy_render import EnvoyPorts, render_to_file

    path = render_to_file(POLICY, service, out_dir / f"{name}.yaml", certs_dir=certs.resolve(), upstream=upstream,
                          peers=peers, ports=EnvoyPorts(inbound=inbound, outbound=None if outbound < 0 else outbound,
                                                        admin=admin, http=http[0] if http else None),
                          http_upstream=",".join(http[1]) if http else "")
    envoy = str(Path(sys.executable).parent / "envoy")
    return [envoy, "-c", str(path), "--use-dynamic-base-id", "--log-level", "warn", "--concurrency", "1"]


def _python_sidecar(service: str, certs: Path, upstream: str, inbound: int, outbound: int,
                    peers: dict[str, list[str]], metrics_port: int = -1, balance: Sequence[str] = ()) -> list[str]:
    argv = [sys.executable, "-m", "sidecar", "--policy", str(POLICY), "--service", service, "--certs", str(certs),
            "--upstream", upstream, "--inbound-port", str(inbound), "--outbound-port", str(outbound),
            "--metrics-port", str(metrics_port)]
    for name, addresses in peers.items():
        argv += ["--peer", f"{name}={','.join(addresses)}"]
    for spec in balance:
        argv += ["--tcp-balance", spec]
    return argv


def check_sidecar(mesh: MeshConfig, sidecar: str) -> None:
    if sidecar == "none" and mesh.router_replicas > 1:
        raise ValueError(f"router.replicas is {mesh.router_replicas}: the routers need a public edge to balance "
                         "them, so run with --sidecar python or --sidecar envoy")


def plan(mesh: MeshConfig, config: Path | None, sidecar: str) -> Topology:
    top = Topology(sidecar=sidecar, router_public=f"127.0.0.1:{mesh.router_port}")
    replicas = [mesh.inference_base_port + i for i in range(mesh.inference_replicas)]
    metrics = [mesh.inference_metrics_port + i if mesh.inference_metrics_port else 0 for i in range(len(replicas))]
    # The mesh file's ports are bound by the children; internal ports must never land on one of them.
    reserve({mesh.router_port, mesh.router_http_port, mesh.billing_port, mesh.router_metrics_port,
             mesh.billing_metrics_port, *replicas, *metrics})
    router_data = ["--data-dir", str(mesh.data_dir / "router")]
    # Billing's ledger and operator token (read by `autoglm budget|price|billing|usage`) under the data dir.
    billing_data = ["--data-dir", str(mesh.data_dir)]
    metrics_on = bool(mesh.router_metrics_port)
    http_port = mesh.router_http_port
    if http_port:
        top.openai_base_url = f"{'http' if sidecar == 'none' else 'https'}://127.0.0.1:{http_port}/v1"
    check_sidecar(mesh, sidecar)
    if sidecar == "none":
        router_data += ["--http-port", str(http_port)] if http_port else []
        top.specs.append(ProcessSpec("billing", _service("services.billing", mesh.billing_port, config,
                                                         mesh.billing_metrics_port, *billing_data),
                                     f"127.0.0.1:{mesh.billing_port}"))
        metering = ["--billing", f"127.0.0.1:{mesh.billing_port}"] if mesh.engine_metering else []
        for i, port in enumerate(replicas):
            top.specs.append(ProcessSpec(f"inference-{i}", _service(
                "services.inference", port, config, metrics[i], "--replica-id", f"inference-{i}", *metering),
                f"127.0.0.1:{port}"))
        top.specs.append(ProcessSpec("router", _service(
            "services.router", mesh.router_port, config, mesh.router_metrics_port,
            "--inference", ",".join(f"127.0.0.1:{p}" for p in replicas),
            "--billing", f"127.0.0.1:{mesh.billing_port}", *router_data), top.router_public))
        top.routers.append({"name": "router", "grpc": top.router_public,
                            "http": f"127.0.0.1:{http_port}" if http_port else ""})
        _attach_metrics(top, mesh, {})
        return top

    certs = mesh.data_dir / "certs"
    top.tls, top.ca_cert = True, certs / "ca.pem"
    routers = [RouterReplica(i, free_port()) for i in range(mesh.router_replicas)]
    several = len(routers) > 1
    for router in routers[1:]:
        router.argv += ["--data-dir", str(mesh.data_dir / router.name),
                        "--shared-secrets-dir", str(mesh.data_dir / "router")]
        router.metrics_port = free_port() if metrics_on else 0
    routers[0].argv += router_data
    routers[0].metrics_port = mesh.router_metrics_port
    router_http: tuple[int, list[str]] | None = None  # (public port, the routers' plain HTTP addresses): Envoy
    tcp_balance: list[str] = []  # the Python sidecar's TLS-passthrough balancer, PORT=ADDR,ADDR
    if http_port and sidecar == "envoy":
        for router in routers:
            router.http_port = free_port()
            router.argv += ["--http-port", str(router.http_port)]
        router_http = (http_port, [f"127.0.0.1:{r.http_port}" for r in routers])
    elif http_port:  # the Python sidecar fronts gRPC only: each router serves HTTPS with its mesh certificate
        for router in routers:
            # One router owns the public port itself; several get internal ones the edge balances across.
            router.http_port = free_port() if several else http_port
            router.argv += ["--http-port", str(router.http_port), "--http-tls-cert", str(certs / "router.pem"),
                            "--http-tls-key", str(certs / "router.key")]
        if several:
            tcp_balance = [f"{http_port}={','.join(f'127.0.0.1:{r.http_port}' for r in routers)}"]

    sidecar_metrics: dict[str, str] = {}

    def sidecar_argv(name: str, service: str, upstream: str, inbound: int, outbound: int,
                     peers: dict[str, list[str]], http: tuple[int, list[str]] | None = None,
                     balance: Sequence[str] = ()) -> list[str]:
        port = free_port()
        if sidecar == "envoy":  # Envoy's admin listener serves /stats/prometheus
            sidecar_metrics[name] = f"http://127.0.0.1:{port}/stats/prometheus"
            return _envoy_sidecar(name, service, certs, upstream, inbound, outbound, peers, mesh.data_dir / "envoy",
                                  port, http)
        if not metrics_on:
            return _python_sidecar(service, certs, upstream, inbound, outbound, peers, balance=balance)
        sidecar_metrics[name] = f"http://127.0.0.1:{port}/metrics"
        return _python_sidecar(service, certs, upstream, inbound, outbound, peers, port, balance)

    billing_internal = free_port()
    top.specs.append(ProcessSpec("billing", _service("services.billing", billing_internal, config,
                                                     mesh.billing_metrics_port, *billing_data),
                                 f"127.0.0.1:{billing_internal}"))
    top.specs.append(ProcessSpec("billing-sidecar", sidecar_argv(
        "billing-sidecar", "billing", f"127.0.0.1:{billing_internal}", mesh.billing_port, -1, {}),
        f"127.0.0.1:{mesh.billing_port}", "tcp"))
    for i, port in enumerate(replicas):
        internal = free_port()
        # Engine-side metering: the replica reaches billing through its sidecar's outbound listener (mTLS;
        # the policy lets inference call BillingService/ReportEngineUsage only).
        outbound, peers, metering = -1, {}, []
        if mesh.engine_metering:
            outbound = free_port()
            peers = {"billing": [f"127.0.0.1:{mesh.billing_port}"]}
            metering = ["--billing", f"127.0.0.1:{outbound}"]
        top.specs.append(ProcessSpec(f"inference-{i}", _service(
            "services.inference", internal, config, metrics[i], "--replica-id", f"inference-{i}", *metering),
            f"127.0.0.1:{internal}"))
        top.specs.append(ProcessSpec(f"inference-{i}-sidecar", sidecar_argv(
            f"inference-{i}-sidecar", "inference", f"127.0.0.1:{internal}", port, outbound, peers),
            f"127.0.0.1:{port}", "tcp"))
    # The public edge balances across every router (least outstanding requests); it is also router 0's
    # outbound listener to billing, as the one router's sidecar has always been.
    edge_upstream = ",".join(r.address for r in routers)
    for router in routers:
        router.billing_outbound = free_port()
        router.inference_outbound = [free_port() for _ in replicas]
        if router.index == 0:
            top.specs.append(ProcessSpec("router-sidecar", sidecar_argv(
                "router-sidecar", "router", edge_upstream, mesh.router_port, router.billing_outbound,
                {"billing": [f"127.0.0.1:{mesh.billing_port}"]}, router_http, tcp_balance),
                f"127.0.0.1:{router.billing_outbound}", "tcp"))
        else:  # each further router has outbound listeners of its own, with the router's identity
            top.specs.append(ProcessSpec(f"{router.name}-to-billing", sidecar_argv(
                f"{router.name}-to-billing", "router", router.address, 0, router.billing_outbound,
                {"billing": [f"127.0.0.1:{mesh.billing_port}"]}), f"127.0.0.1:{router.billing_outbound}", "tcp"))
        for i, (port, outbound) in enumerate(zip(replicas, router.inference_outbound, strict=True)):
            # One outbound listener per replica, so the router keeps balancing and ejecting per replica.
            name = f"router-to-inference-{i}" if router.index == 0 else f"{router.name}-to-inference-{i}"
            top.specs.append(ProcessSpec(name, sidecar_argv(
                name, "router", router.address, 0, outbound, {"inference": [f"127.0.0.1:{port}"]}),
                f"127.0.0.1:{outbound}", "tcp"))
        if several:  # the shared registry names replicas by their mesh address; each router dials its own
            inference = ["--inference", ",".join(f"127.0.0.1:{p}" for p in replicas), "--inference-via", ",".join(
                f"127.0.0.1:{p}=127.0.0.1:{o}" for p, o in zip(replicas, router.inference_outbound, strict=True))]
        else:
            inference = ["--inference", ",".join(f"127.0.0.1:{p}" for p in router.inference_outbound)]
        top.specs.append(ProcessSpec(router.name, _service(
            "services.router", router.port, config, router.metrics_port, *inference,
            "--billing", f"127.0.0.1:{router.billing_outbound}", *router.argv), router.address))
        top.routers.append({"name": router.name, "grpc": router.address,
                            "http": f"127.0.0.1:{router.http_port}" if router.http_port else ""})
    _attach_metrics(top, mesh, sidecar_metrics, {r.name: r.metrics_port for r in routers[1:]})
    return top


@dataclass
class RouterReplica:
    """One router process of `router.replicas`: router 0 is `router` (data in <data_dir>/router), router i
    `router-i` (its own data dir for the usage spool and journal; admin token and key pepper router 0's)."""

    index: int
    port: int  # its gRPC port on loopback, behind the public edge
    argv: list[str] = field(default_factory=list)
    metrics_port: int = 0
    http_port: int = 0
    billing_outbound: int = 0
    inference_outbound: list[int] = field(default_factory=list)

    @property
    def name(self) -> str:
        return "router" if self.index == 0 else f"router-{self.index}"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


def _attach_metrics(top: Topology, mesh: MeshConfig, sidecars: dict[str, str],
                    more_routers: dict[str, int] | None = None) -> None:
    services = {"billing": mesh.billing_metrics_port, "router": mesh.router_metrics_port, **(more_routers or {})}
    services.update({f"inference-{i}": mesh.inference_metrics_port + i if mesh.inference_metrics_port else 0
                     for i in range(mesh.inference_replicas)})
    for spec in top.specs:
        if spec.name in sidecars:
            spec.metrics_url = sidecars[spec.name]
        elif services.get(spec.name):
            spec.metrics_url = f"http://127.0.0.1:{services[spec.name]}/metrics"
