"""`autoglm certs init|issue`: the mesh CA and one SPIFFE identity per service."""

from __future__ import annotations

import argparse
import datetime as dt
from pathlib import Path
from typing import Any

DEFAULT_DIR = Path(".autoglm/certs")


def _init(args: argparse.Namespace) -> int:
    from sidecar import certs

    path = certs.init_ca(args.dir, force=args.force)
    print(path)
    for service in args.services:
        print(certs.issue_to(args.dir, service, trust_domain=args.trust_domain, namespace=args.namespace,
                             ttl=dt.timedelta(hours=args.ttl_hours)))
    return 0


def _issue(args: argparse.Namespace) -> int:
    from sidecar import certs

    for service in args.services:
        path = certs.issue_to(args.dir, service, trust_domain=args.trust_domain, namespace=args.namespace,
                              ttl=dt.timedelta(hours=args.ttl_hours))
        print(f"{path}  {certs.spiffe_id(service, args.trust_domain, args.namespace)}  "
              f"valid until {certs.not_valid_after(path.read_bytes()).isoformat()}")
    return 0


def add_certs_commands(subparsers: Any) -> None:
    certs_parser = subparsers.add_parser("certs", help="mesh CA and per-service certificates (mTLS identities)")
    sub = certs_parser.add_subparsers(dest="certs_command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--dir", type=Path, default=DEFAULT_DIR, help=f"certificate directory (default {DEFAULT_DIR})")
        p.add_argument("--trust-domain", default="autoglm.local")
        p.add_argument("--namespace", default="default")
        p.add_argument("--ttl-hours", type=float, default=24.0, help="certificate lifetime (default 24 h)")

    init = sub.add_parser("init", help="create the CA (kept if present) and optionally issue service certs")
    common(init)
    init.add_argument("services", nargs="*", help="services to issue certificates for right away")
    init.add_argument("--force", action="store_true", help="replace an existing CA")
    init.set_defaults(func=_init)

    issue = sub.add_parser("issue", help="issue (or rotate) certificates: spiffe://<td>/ns/<ns>/sa/<service>")
    common(issue)
    issue.add_argument("services", nargs="+")
    issue.set_defaults(func=_issue)
