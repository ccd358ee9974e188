"""`autoglm usage`: what has been spent, from billing's ledger (GetUsageReport).

    autoglm usage                     last 24 h grouped by model, as a table
    autoglm usage --since 7d --by api_key --format json
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import re
import sys
from typing import Any

import grpc
from google.protobuf import timestamp_pb2

from autoglm.billing.v1 import billing_service_pb2 as pb2
from autoglm.billing.v1 import billing_service_pb2_grpc as pb2_grpc
from services.cli.endpoint import billing_token, load_endpoint, operator_channel

DIMENSIONS = {
    "tenant": pb2.REPORT_DIMENSION_TENANT,
    "api_key": pb2.REPORT_DIMENSION_API_KEY,
    "model": pb2.REPORT_DIMENSION_MODEL,
    "version": pb2.REPORT_DIMENSION_MODEL_VERSION,
    "status": pb2.REPORT_DIMENSION_STATUS,
    "source": pb2.REPORT_DIMENSION_SOURCE,
}
_SPAN = re.compile(r"^(\d+)([mhdw])$")
_UNIT = {"m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def parse_since(text: str) -> dt.timedelta:
    match = _SPAN.match(text.strip())
    if not match:
        raise argparse.ArgumentTypeError(f"--since takes a span like 30m, 1h, 7d or 2w, got {text!r}")
    return dt.timedelta(**{_UNIT[match.group(2)]: int(match.group(1))})


def money(micros: int, currency: str) -> str:
    sign = "-" if micros < 0 else ""
    whole, rest = divmod(abs(micros), 1_000_000)
    return f"{sign}{whole}.{rest:06d} {currency}".strip()


def _row(row: pb2.UsageReportRow) -> dict[str, Any]:
    return {
        **dict(row.group), "requests": row.requests, "prompt_tokens": row.prompt_tokens,
        "completion_tokens": row.completion_tokens, "cached_requests": row.cached_requests,
        "cost_micros": row.cost.micros, "currency": row.cost.currency_code,
        "cost": money(row.cost.micros, row.cost.currency_code), "anomalous": row.anomalous,
    }


async def fetch_report(billing: str, since: dt.timedelta, by: list[str], tenant: str,
                       token: str = "") -> dict[str, Any]:
    end = dt.datetime.now(dt.UTC) + dt.timedelta(minutes=1)
    start_ts, end_ts = timestamp_pb2.Timestamp(), timestamp_pb2.Timestamp()
    start_ts.FromDatetime(end - since)
    end_ts.FromDatetime(end)
    request = pb2.GetUsageReportRequest(start_time=start_ts, end_time=end_ts,
                                        group_by=[DIMENSIONS[b] for b in by], tenant_id=tenant)
    async with operator_channel(billing, token) as channel:
        reply = await pb2_grpc.BillingServiceStub(channel).GetUsageReport(request, timeout=30)
    return {"rows": [_row(r) for r in reply.rows], "total": _row(reply.total)}


def render_table(report: dict[str, Any], by: list[str]) -> str:
    columns = [*by, "requests", "prompt_tokens", "completion_tokens", "cost"]
    rows = [*report["rows"], {**report["total"], **{b: "TOTAL" for b in by[:1]}}]
    widths = {c: max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in columns}
    lines = ["  ".join(c.ljust(widths[c]) for c in columns)]
    lines += ["  ".join(str(r.get(c, "")).ljust(widths[c]) for c in columns) for r in rows]
    return "\n".join(lines)


def _usage(args: argparse.Namespace) -> int:
    billing = args.billing or load_endpoint(args.data_dir).billing
    by = args.by or ["model"]
    try:
        report = asyncio.run(fetch_report(billing, args.since, by, args.tenant,
                                          billing_token(args.data_dir, args.operator_token)))
    except grpc.aio.AioRpcError as error:
        print(f"error: {error.code().name}: {error.details()}", file=sys.stderr)
        return 1
    print(json.dumps(report, indent=2) if args.format == "json" else render_table(report, by))
    return 0


def add_usage_commands(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    usage = subparsers.add_parser("usage", help="tokens and cost from the billing ledger")
    usage.add_argument("--since", type=parse_since, default=parse_since("24h"), help="e.g. 30m, 1h, 7d (default 24h)")
    usage.add_argument("--by", action="append", choices=sorted(DIMENSIONS), help="group by (repeatable; default model)")
    usage.add_argument("--tenant", default="", help="only this tenant")
    usage.add_argument("--format", choices=["table", "json"], default="table")
    usage.add_argument("--billing", default=None, help="billing address (default: the local mesh's)")
    usage.add_argument("--data-dir", default=".autoglm", help="mesh data dir (endpoint.json, billing_operator_token)")
    usage.add_argument("--operator-token", default=None,
                       help="billing's operator token (default: $AUTOGLM_BILLING_TOKEN, else the data dir's)")
    usage.set_defaults(func=_usage)
