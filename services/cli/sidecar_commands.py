"""`autoglm sidecar run|render-envoy`: run a Python sidecar, or render the same policy for Envoy."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any


def _run(args: argparse.Namespace) -> int:
    from sidecar.main import run_from_args

    return run_from_args(args)


def _render(args: argparse.Namespace) -> int:
    from sidecar.envoy_render import EnvoyPorts, render_to_file
    from sidecar.policy import PolicyError

    try:
        render_to_file(args.policy, args.service, args.output, certs_dir=args.certs,
                       upstream=args.upstream, peers=dict(args.peer),
                       ports=EnvoyPorts(inbound=args.inbound_port, outbound=None if args.outbound_port < 0 else args.outbound_port, admin=args.admin_port,
                                        http=None if args.http_port < 0 else args.http_port),
                       http_upstream=args.http_upstream if args.http_port >= 0 else "")
    except (PolicyError, ValueError) as exc:
        print(f"autoglm sidecar render-envoy: {exc}", file=sys.stderr)
        return 2
    print(args.output)
    return 0


def add_sidecar_commands(subparsers: Any) -> None:
    from sidecar.main import add_run_arguments, parse_peer

    parser = subparsers.add_parser("sidecar", help="the policy sidecar: run it, or render its policy for Envoy")
    sub = parser.add_subparsers(dest="sidecar_command", required=True)
    run = sub.add_parser("run", help="run the Python sidecar for one service")
    add_run_arguments(run)
    run.set_defaults(func=_run)

    render = sub.add_parser("render-envoy", help="render the policy as an Envoy v3 bootstrap for one service")
    render.add_argument("--policy", type=Path, required=True)
    render.add_argument("--service", required=True)
    render.add_argument("-o", "--output", type=Path, required=True)
    render.add_argument("--certs", type=Path, default=Path(".autoglm/certs"),
                        help="certificate directory as Envoy will see it (relative: to Envoy's working directory)")
    render.add_argument("--upstream", default="127.0.0.1:50051", help="the local service's address")
    render.add_argument("--peer", action="append", default=[], type=parse_peer, metavar="NAME=ADDR[,ADDR]")
    render.add_argument("--inbound-port", type=int, default=15443)
    render.add_argument("--outbound-port", type=int, default=15001, help="-1: no outbound listener")
    render.add_argument("--admin-port", type=int, default=15000)
    render.add_argument("--http-port", type=int, default=-1,
                        help="public HTTPS port fronting the service's HTTP API (the router's OpenAI API); -1: none")
    render.add_argument("--http-upstream", default="127.0.0.1:8080", help="the service's plain HTTP address")
    render.set_defaults(func=_render)


def main(argv: list[str] | None = None) -> int:
    """`python -m services.cli.sidecar_commands run|render-envoy ...` (the same as `autoglm sidecar ...`)."""
    parser = argparse.ArgumentParser(prog="autoglm")
    add_sidecar_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["sidecar", *(argv if argv is not None else sys.argv[1:])])
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
