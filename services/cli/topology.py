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
"""

from __future__ import annotations

import sys
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


def _service(module: str, port: int, config: Path | None, metrics_port: int, *extra: str) -> list[str]:
    argv = [sys.executable, "-m", module, "--port", str(port)]
    if metrics_port:
        argv += ["--metrics-port", str(metrics_port)]
    if config:
        argv += ["--config", str(config)]
    return [*argv, *extra]


def _envoy_sidecar(name: str, service: str, certs: Path, upstream: str, inbound: int, outbound: int,
                   peers: dict[str, list[str]], out_dir: Path, admin: int, http: tuple[int, str] | None = None
                   ) -> list[str]:
    """`http`: (public HTTPS port, the service's plain HTTP address) when this Envoy fronts an HTTP API."""
    from sidecar.envoy_render import EnvoyPorts, render_to_file

    path = render_to_file(POLICY, service, out_dir / f"{name}.yaml", certs_dir=certs.resolve(), upstream=upstream,
                          peers=peers, ports=EnvoyPorts(inbound=inbound, outbound=None if outbound < 0 else outbound,
                                                        admin=admin, http=http[0] if http else None),
                          http_upstream=http[1] if http else "")
    envoy = str(Path(sys.executable).parent / "envoy")
    return [envoy, "-c", str(path), "--use-dynamic-base-id", "--log-level", "warn", "--concurrency", "1"]


def _python_sidecar(service: str, certs: Path, upstream: str, inbound: int, outbound: int,
                    peers: dict[str, list[str]], metrics_port: int = -1) -> list[str]:
    argv = [sys.executable, "-m", "sidecar", "--policy", str(POLICY), "--service", service, "--certs", str(certs),
            "--upstream", upstream, "--inbound-port", str(inbound), "--outbound-port", str(outbound),
            "--metrics-port", str(metrics_port)]
    for name, addresses in peers.items():
        argv += ["--peer", f"{name}={','.join(addresses)}"]
    return argv


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
        _attach_metrics(top, mesh, {})
        return top

    certs = mesh.data_dir / "certs"
    top.tls, top.ca_cert = True, certs / "ca.pem"
    router_http: tuple[int, str] | None = None  # (public port, the router's plain HTTP address) for Envoy
    if http_port and sidecar == "envoy":
        internal_http = free_port()
        router_data += ["--http-port", str(internal_http)]
        router_http = (http_port, f"127.0.0.1:{internal_http}")
    elif http_port:  # the Python sidecar fronts gRPC only: the router serves HTTPS with its mesh certificate
        router_data += ["--http-port", str(http_port), "--http-tls-cert", str(certs / "router.pem"),
                        "--http-tls-key", str(certs / "router.key")]

    sidecar_metrics: dict[str, str] = {}

    def sidecar_argv(name: str, service: str, upstream: str, inbound: int, outbound: int,
                     peers: dict[str, list[str]], http: tuple[int, str] | None = None) -> list[str]:
        port = free_port()
        if sidecar == "envoy":  # Envoy's admin listener serves /stats/prometheus
            sidecar_metrics[name] = f"http://127.0.0.1:{port}/stats/prometheus"
            return _envoy_sidecar(name, service, certs, upstream, inbound, outbound, peers, mesh.data_dir / "envoy",
                                  port, http)
        if not metrics_on:
            return _python_sidecar(service, certs, upstream, inbound, outbound, peers)
        sidecar_metrics[name] = f"http://127.0.0.1:{port}/metrics"
        return _python_sidecar(service, certs, upstream, inbound, outbound, peers, port)

    billing_internal = free_port()
    top.specs.append(ProcessSpec("billing", _service("services.billing", billing_internal, config,
                                                     mesh.billing_metrics_port, *billing_data),
                                 f"127.0.0.1:{billing_internal}"))
    top.specs.append(ProcessSpec("billing-sidecar", sidecar_argv(
        "billing-sidecar", "billing", f"127.0.0.1:{billing_internal}", mesh.billing_port, -1, {}),
        f"127.0.0.1:{mesh.billing_port}", "tcp"))
    replica_outbound: list[int] = []
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
        replica_outbound.append(free_port())
    router_internal, billing_outbound = free_port(), free_port()
    top.specs.append(ProcessSpec("router-sidecar", sidecar_argv(
        "router-sidecar", "router", f"127.0.0.1:{router_internal}", mesh.router_port, billing_outbound,
        {"billing": [f"127.0.0.1:{mesh.billing_port}"]}, router_http), f"127.0.0.1:{billing_outbound}", "tcp"))
    for i, (port, outbound) in enumerate(zip(replicas, replica_outbound, strict=True)):
        # One outbound listener per replica, so the router keeps balancing and ejecting per replica.
        top.specs.append(ProcessSpec(f"router-to-inference-{i}", sidecar_argv(
            f"router-to-inference-{i}", "router", f"127.0.0.1:{router_internal}", 0, outbound,
            {"inference": [f"127.0.0.1:{port}"]}), f"127.0.0.1:{outbound}", "tcp"))
    top.specs.append(ProcessSpec("router", _service(
        "services.router", router_internal, config, mesh.router_metrics_port,
        "--inference", ",".join(f"127.0.0.1:{p}" for p in replica_outbound),
        "--billing", f"127.0.0.1:{billing_outbound}", *router_data), f"127.0.0.1:{router_internal}"))
    _attach_metrics(top, mesh, sidecar_metrics)
    return top


def _attach_metrics(top: Topology, mesh: MeshConfig, sidecars: dict[str, str]) -> None:
    services = {"billing": mesh.billing_metrics_port, "router": mesh.router_metrics_port}
    services.update({f"inference-{i}": mesh.inference_metrics_port + i if mesh.inference_metrics_port else 0
                     for i in range(mesh.inference_replicas)})
    for spec in top.specs:
        if spec.name in sidecars:
            spec.metrics_url = sidecars[spec.name]
        elif services.get(spec.name):
            spec.metrics_url = f"http://127.0.0.1:{services[spec.name]}/metrics"
