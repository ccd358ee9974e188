"""Command line of the sidecar process (shared by `python -m sidecar` and `autoglm sidecar run`)."""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
from pathlib import Path
from typing import IO

from services.common.grpc_engine import prefer_iomgr_polling
from services.common.logging import configure_logging
from services.common.tracing import configure_tracing
from sidecar.handshake_log import HandshakeLog, capture_handshake_failures
from sidecar.policy import PolicyError
from sidecar.runtime import SidecarConfig, build_sidecar

try:
    import uvloop as _uvloop
except ImportError:  # optional: the default asyncio loop works too
    _uvloop = None  # type: ignore[assignment]


def parse_peer(value: str) -> tuple[str, list[str]]:
    name, sep, addresses = value.partition("=")
    if not sep or not name or not addresses:
        raise argparse.ArgumentTypeError(f"--peer expects NAME=HOST:PORT[,HOST:PORT...], got {value!r}")
    return name, [a.strip() for a in addresses.split(",") if a.strip()]


def parse_tcp_balance(value: str) -> tuple[int, list[str]]:
    port, sep, addresses = value.partition("=")
    backends = [a.strip() for a in addresses.split(",") if a.strip()]
    if not sep or not port.isdigit() or not backends:
        raise argparse.ArgumentTypeError(f"--tcp-balance expects PORT=HOST:PORT[,HOST:PORT...], got {value!r}")
    return int(port), backends


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--policy", type=Path, required=True, help="mesh policy YAML (hot-reloaded)")
    parser.add_argument("--service", required=True, help="the local service this sidecar fronts (router, ...)")
    parser.add_argument("--certs", type=Path, required=True,
                        help="directory with ca.pem and <service>.pem/.key (autoglm certs init/issue)")
    parser.add_argument("--upstream", required=True,
                        help="the local service's address, host:port or unix:/path; several copies of it "
                             "comma-separated (each call to the healthy one with the fewest in flight)")
    parser.add_argument("--inbound-port", type=int, default=0, help="mTLS listener for peers (0: any free port)")
    parser.add_argument("--outbound-port", type=int, default=0,
                        help="plaintext loopback listener the local service calls its peers through (-1: none)")
    parser.add_argument("--admin-port", type=int, default=0, help="SidecarAdminService on 127.0.0.1")
    parser.add_argument("--metrics-port", type=int, default=0, help="Prometheus /metrics on 127.0.0.1 (-1: off)")
    parser.add_argument("--peer", action="append", default=[], type=parse_peer, metavar="NAME=ADDR[,ADDR]",
                        help="a peer service's sidecar inbound address(es); repeat per peer")
    parser.add_argument("--tcp-balance", action="append", default=[], type=parse_tcp_balance,
                        metavar="PORT=ADDR[,ADDR]",
                        help="pass TCP connections on PORT through to the address with the fewest open ones "
                             "(TLS-passthrough, e.g. the routers' own HTTPS ports); repeatable")
    parser.add_argument("--host", default="127.0.0.1", help="address the inbound/outbound listeners bind")
    parser.add_argument("--no-access-log", action="store_true", help="do not log one line per call")
    parser.add_argument("--otlp-endpoint", default="", help="send spans to this OTLP/gRPC collector")
    parser.add_argument("--log-level", default="INFO")
    parser.add_argument("--no-handshake-log", action="store_true",
                        help="do not turn grpc's refused-TLS-handshake lines into tls_handshake_failed events")


def buffered_stderr() -> IO[str]:
    """A block-buffered text stream on fd 2 (sys.stderr itself is line-buffered: one syscall per line)."""
    return open(sys.stderr.fileno(), "w", buffering=1 << 16, encoding="utf-8", closefd=False)


async def run(args: argparse.Namespace, handshakes: HandshakeLog | None = None) -> int:
    config = SidecarConfig(
        policy_path=args.policy, service=args.service, certs_dir=args.certs, upstream=args.upstream,
        peers=dict(args.peer), host=args.host, inbound_port=args.inbound_port,
        outbound_port=None if args.outbound_port < 0 else args.outbound_port, admin_port=args.admin_port,
        metrics_port=None if args.metrics_port < 0 else args.metrics_port, access_log=not args.no_access_log,
        tcp_balance=dict(args.tcp_balance),
        # Access-log lines skip structlog's processor chain: one json.dumps into a buffered stderr.
        access_log_stream=buffered_stderr())
    running = await build_sidecar(config)
    if handshakes is not None:
        handshakes.on_refused = running.count_refused_handshake
    # One machine-readable line on stdout with the bound ports, for launchers and tests.
    # One write, newline included: other threads write log lines to the same file.
    sys.stdout.write(json.dumps({"sidecar": args.service, **running.ports()}) + "\n")
    sys.stdout.flush()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await running.stop(grace=5)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m sidecar",
        description="The Open-AutoGLM sidecar: mTLS, authorization, timeouts, retries, circuit breaking and "
                    "trace context for one service. Prints one JSON line with the bound ports.")
    add_run_arguments(parser)
    return run_from_args(parser.parse_args(argv))


def run_from_args(args: argparse.Namespace) -> int:
    prefer_iomgr_polling()
    handshakes = None if args.no_handshake_log else capture_handshake_failures(args.service)
    configure_logging(f"sidecar-{args.service}", args.log_level)
    configure_tracing(f"sidecar-{args.service}", args.otlp_endpoint)
    try:
        # libuv's event loop (uvloop) costs less CPU per proxied call than the default selector loop.
        with asyncio.Runner(loop_factory=_uvloop.new_event_loop if _uvloop is not None else None) as runner:
            return runner.run(run(args, handshakes))
    except (PolicyError, FileNotFoundError) as exc:
        print(f"sidecar: {exc}", file=sys.stderr)
        return 2
    finally:
        sys.stderr.flush()
        if handshakes is not None:
            handshakes.close()
