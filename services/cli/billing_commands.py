"""`autoglm billing report`, `autoglm budget set|list`, `autoglm price set|list`: billing over gRPC.

  autoglm billing report --by model --since 7d [--granularity day] [--format table|csv|json]
  autoglm budget set --tenant acme --amount 50 --period monthly [--key K | --tag team=search] [--soft]
  autoglm budget list [--tenant acme]
  autoglm price set MODEL --input 2.0 --output 6.0 [--version V] [--cached 0.5] [--effective ISO-TIME]
  autoglm price list [MODEL]

Amounts on the command line are decimal currency units (e.g. 2.5 = 2,500,000 micro-units), parsed exactly.
Every command sends billing's operator token (--operator-token, $AUTOGLM_BILLING_TOKEN, or
`<data dir>/billing_operator_token`, which billing makes on first start).
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import io
import json
import re
import sys
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from typing import Any, cast

import grpc

from autoglm.billing.v1 import billing_service_pb2 as pb2
from autoglm.billing.v1 import billing_service_pb2_grpc as pb2_grpc
from autoglm.common.v1 import money_pb2
from services.cli.endpoint import billing_token, load_endpoint, operator_channel

DEFAULT_BILLING = "127.0.0.1:50061"
DIMENSIONS = {"tenant": 1, "api_key": 2, "key": 2, "model": 3, "version": 4, "model_version": 4, "tag": 5,
              "status": 6}
GRANULARITIES = {"none": 0, "minute": 1, "hour": 2, "day": 3, "month": 4}
PERIODS = {"daily": 1, "weekly": 2, "monthly": 3}


def parse_money(text: str) -> int:
    """Decimal currency units → integer micro-units, exactly (at most 6 decimals)."""
    try:
        value = Decimal(text)
    except InvalidOperation as exc:
        raise argparse.ArgumentTypeError(f"{text!r} is not an amount like 2.5") from exc
    micros = value * 1_000_000
    if micros != micros.to_integral_value() or value < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: amounts are >= 0 with at most 6 decimals")
    return int(micros)


def format_money(micros: int) -> str:
    return f"{Decimal(micros) / 1_000_000:.6f}"


def parse_since(text: str, now: float) -> float:
    match = re.fullmatch(r"(\d+)([smhdw])", text)
    if match:
        return now - int(match[1]) * {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}[match[2]]
    try:
        return datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp()
    except ValueError as exc:
        raise SystemExit(f"--since {text!r}: use a duration like 7d / 12h or an ISO time") from exc


def table(headers: Sequence[str], rows: Sequence[Sequence[str]], fmt: str) -> str:
    if fmt == "json":
        return json.dumps([dict(zip(headers, r, strict=True)) for r in rows], indent=2)
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.writer(out)
        writer.writerow(headers)
        writer.writerows(rows)
        return out.getvalue().rstrip("\n")
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(lines)


async def _call(address: str, token: str, fn: Callable[[pb2_grpc.BillingServiceStub], Any]) -> Any:
    async with operator_channel(address, token) as chan:
        return await fn(pb2_grpc.BillingServiceStub(chan))


def _run(args: argparse.Namespace, fn: Callable[[pb2_grpc.BillingServiceStub], Any]) -> Any:
    try:
        args.billing = args.billing or load_endpoint(args.data_dir).billing
        return asyncio.run(_call(args.billing, billing_token(args.data_dir, args.operator_token), fn))
    except grpc.aio.AioRpcError as err:
        print(f"billing at {args.billing}: {err.code().name}: {err.details()}", file=sys.stderr)
        raise SystemExit(1) from None


def _report(args: argparse.Namespace) -> int:
    now = time.time()
    start = parse_since(args.since, now)
    group = [DIMENSIONS[d] for d in args.by]
    request = pb2.GetUsageReportRequest(group_by=cast(Any, group), tag_key=args.tag_key, granularity=cast(Any, GRANULARITIES[args.granularity]),
                                        tenant_id=args.tenant, top_n=args.top)
    request.start_time.FromMicroseconds(int(start * 1e6))
    request.end_time.FromMicroseconds(int(now * 1e6) + 1)
    reply = _run(args, lambda stub: stub.GetUsageReport(request, timeout=30))
    names = [n for n in ("tenant", "api_key", "model", "model_version", "tag", "status")
             if DIMENSIONS.get(n) in group]
    headers = (["bucket"] if args.granularity != "none" else []) + names + [
        "requests", "prompt_tokens", "completion_tokens", "cost", "anomalous"]
    rows = []
    for row in [*reply.rows, reply.total] if args.format == "table" else reply.rows:
        is_total = row is reply.total
        bucket = [("TOTAL" if is_total else row.bucket_start.ToDatetime(UTC).isoformat())] \
            if args.granularity != "none" else []
        dims = [("TOTAL" if is_total and not bucket and i == 0 else row.group.get(n, "")) for i, n in enumerate(names)]
        rows.append([*bucket, *dims, str(row.requests), str(row.prompt_tokens), str(row.completion_tokens),
                     format_money(row.cost.micros), "yes" if row.anomalous else ""])
    print(table(headers, rows, args.format))
    return 0


def budget_message(*, tenant: str, key: str = "", tag: str = "", amount: int | None = None, tokens: int | None = None,
                   period: str = "monthly", tz: str = "UTC", soft: bool = False, webhook: str = "", budget_id: str = "",
                   currency: str = "USD") -> pb2.Budget:
    """The Budget `autoglm budget set` sends (the console's budget form sends the same)."""
    if tag:
        tag_key, _, tag_value = tag.partition("=")
        scope = pb2.BudgetScope(kind=pb2.SCOPE_KIND_TAG, tenant_id=tenant, tag_key=tag_key, tag_value=tag_value)
    elif key:
        scope = pb2.BudgetScope(kind=pb2.SCOPE_KIND_API_KEY, tenant_id=tenant, api_key_id=key)
    else:
        scope = pb2.BudgetScope(kind=pb2.SCOPE_KIND_TENANT, tenant_id=tenant)
    rolling = re.fullmatch(r"rolling(\d+)d?", period)
    kind = pb2.PERIOD_KIND_ROLLING_DAYS if rolling else PERIODS.get(period, 0)
    budget = pb2.Budget(budget_id=budget_id, scope=scope,
                        period=pb2.BudgetPeriod(kind=cast(Any, kind), rolling_days=int(rolling[1]) if rolling else 0,
                                                time_zone=tz),
                        tokens=tokens or 0, enforcement=pb2.ENFORCEMENT_SOFT if soft else pb2.ENFORCEMENT_HARD,
                        webhook_url=webhook)
    if amount is not None:
        budget.amount.CopyFrom(money_pb2.Money(currency_code=currency, micros=amount))
    return budget


def _budget_set(args: argparse.Namespace) -> int:
    budget = budget_message(tenant=args.tenant or "", key=args.key, tag=args.tag, amount=args.amount,
                            tokens=args.tokens, period=args.period, tz=args.tz, soft=args.soft,
                            webhook=args.webhook or "", budget_id=args.id or "", currency=args.currency)
    if args.id and args.update:
        reply = _run(args, lambda stub: stub.UpdateBudget(pb2.UpdateBudgetRequest(budget=budget, actor=args.actor)))
    else:
        reply = _run(args, lambda stub: stub.CreateBudget(pb2.CreateBudgetRequest(budget=budget, actor=args.actor)))
    print(reply.budget.budget_id)
    return 0


def fired_levels(status: pb2.BudgetStatus) -> str:
    """The alert levels a budget fired this period, oldest first: `WARNING 2026-03-01T10:00:00Z, ...`."""
    return ", ".join(f"{pb2.AlertLevel.Name(f.level).removeprefix('ALERT_LEVEL_')} "
                     f"{f.fire_time.ToDatetime(UTC).strftime('%Y-%m-%dT%H:%M:%SZ')}" for f in status.fired)


def _budget_list(args: argparse.Namespace) -> int:
    reply = _run(args, lambda stub: stub.ListBudgets(pb2.ListBudgetsRequest(tenant_id=args.tenant or "")))
    rows = []
    for st in reply.budgets:
        b = st.budget
        scope = {1: f"tenant {b.scope.tenant_id}", 2: f"key {b.scope.api_key_id}",
                 3: f"tag {b.scope.tag_key}={b.scope.tag_value}"}.get(b.scope.kind, "?")
        tokens = bool(st.effective_tokens)
        spent = str(st.spent_tokens) if tokens else format_money(st.spent_amount.micros)
        held = str(st.held_tokens) if tokens else format_money(st.held_amount.micros)
        leased = str(st.leased_tokens) if tokens else format_money(st.leased_amount.micros)
        limit = str(st.effective_tokens) if tokens else format_money(st.effective_amount.micros)
        rows.append([b.budget_id, scope, pb2.PeriodKind.Name(b.period.kind).removeprefix("PERIOD_KIND_").lower(),
                     spent, held, leased, limit, f"{st.utilization_permille / 10:.1f}%",
                     pb2.AlertLevel.Name(st.level).removeprefix("ALERT_LEVEL_").replace("UNSPECIFIED", "ok"),
                     pb2.Enforcement.Name(b.enforcement).removeprefix("ENFORCEMENT_").lower(), fired_levels(st)])
    # held: open per-request holds; leased: the unused room of routers' leases (both count against the limit);
    # fired: each alert level reached this period and when (UTC)
    print(table(["id", "scope", "period", "spent", "held", "leased", "limit", "used", "level", "enforcement",
                 "fired"], rows, args.format))
    return 0


def _price_set(args: argparse.Namespace) -> int:
    def money(micros: int) -> money_pb2.Money:
        return money_pb2.Money(currency_code=args.currency, micros=micros)

    price = pb2.Price(model=args.model, model_version=args.version, input_per_million=money(args.input),
                      output_per_million=money(args.output))
    if args.cached is not None:
        price.cached_per_million.CopyFrom(money(args.cached))
    if args.effective:
        price.effective_time.FromDatetime(datetime.fromisoformat(args.effective).astimezone(UTC))
    reply = _run(args, lambda stub: stub.CreatePrice(pb2.CreatePriceRequest(price=price, actor=args.actor)))
    print(reply.price.price_id)
    return 0


def _price_list(args: argparse.Namespace) -> int:
    reply = _run(args, lambda stub: stub.ListPrices(pb2.ListPricesRequest(model=args.model or "")))
    rows = [[p.price_id, p.model, p.model_version or "*", format_money(p.input_per_million.micros),
             format_money(p.output_per_million.micros),
             format_money(p.cached_per_million.micros) if p.HasField("cached_per_million") else "",
             p.effective_time.ToDatetime(UTC).isoformat()] for p in reply.prices]
    print(table(["id", "model", "version", "input/M", "output/M", "cached/M", "effective"], rows, args.format))
    return 0


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--billing", default=None,
                        help=f"billing address (default: the local mesh's operator address, else {DEFAULT_BILLING})")
    parser.add_argument("--data-dir", default=".autoglm",
                        help="mesh data dir holding endpoint.json and billing_operator_token")
    parser.add_argument("--operator-token", default=None,
                        help="billing's operator token (default: $AUTOGLM_BILLING_TOKEN, else the data dir's)")
    parser.add_argument("--format", choices=["table", "csv", "json"], default="table")
    parser.add_argument("--actor", default="cli",
                        help="your name, kept in the audit log beside the operator identity that made the change")
    parser.add_argument("--currency", default="USD")


def add_billing_commands(subparsers: Any) -> None:
    """Register `billing report`, `budget set|list` and `price set|list` on the `autoglm` parser."""
    billing = subparsers.add_parser("billing", help="usage reports from the ledger")
    billing_sub = billing.add_subparsers(dest="billing_command", required=True)
    report = billing_sub.add_parser("report", help="requests, tokens and cost grouped by dimensions")
    _common(report)
    report.add_argument("--by", action="append", default=[], choices=sorted(DIMENSIONS),
                        help="group by (repeatable)")
    report.add_argument("--since", default="7d", help="window start: 7d, 12h, 30m or an ISO time (default 7d)")
    report.add_argument("--granularity", choices=sorted(GRANULARITIES), default="none")
    report.add_argument("--tag-key", default="", help="the tag grouped by --by tag")
    report.add_argument("--tenant", default="")
    report.add_argument("--top", type=int, default=0, help="keep the top N groups by cost")
    report.set_defaults(func=_report)

    budget = subparsers.add_parser("budget", help="budgets per tenant, api key or tag")
    budget_sub = budget.add_subparsers(dest="budget_command", required=True)
    bset = budget_sub.add_parser("set", help="create a budget (or change one with --id ... --update)")
    _common(bset)
    bset.add_argument("--tenant", default="")
    bset.add_argument("--key", default="", help="an API key budget")
    bset.add_argument("--tag", default="", help="a tag budget: KEY=VALUE")
    bset.add_argument("--amount", type=parse_money, default=None, help="limit in currency units, e.g. 50")
    bset.add_argument("--tokens", type=int, default=None, help="limit in tokens")
    bset.add_argument("--period", default="monthly", help="daily, weekly, monthly or rollingNd (e.g. rolling7d)")
    bset.add_argument("--tz", default="UTC", help="IANA time zone of calendar periods")
    bset.add_argument("--soft", action="store_true", help="alert only, never deny")
    bset.add_argument("--webhook", default="", help="URL that receives this budget's alerts")
    bset.add_argument("--id", default="", help="budget id (chosen by the server when empty)")
    bset.add_argument("--update", action="store_true", help="change the budget --id instead of creating one")
    bset.set_defaults(func=_budget_set)
    blist = budget_sub.add_parser("list", help="budgets with their spend this period")
    _common(blist)
    blist.add_argument("--tenant", default="")
    blist.set_defaults(func=_budget_list)

    price = subparsers.add_parser("price", help="prices per model per million tokens")
    price_sub = price.add_subparsers(dest="price_command", required=True)
    pset = price_sub.add_parser("set", help="add a price, in force from --effective (default now)")
    _common(pset)
    pset.add_argument("model")
    pset.add_argument("--version", default="")
    pset.add_argument("--input", type=parse_money, required=True, help="per million prompt tokens, e.g. 2.5")
    pset.add_argument("--output", type=parse_money, required=True, help="per million completion tokens")
    pset.add_argument("--cached", type=parse_money, default=None, help="per million cached tokens")
    pset.add_argument("--effective", default="", help="ISO time the price takes effect (default now)")
    pset.set_defaults(func=_price_set)
    plist = price_sub.add_parser("list", help="the price table")
    _common(plist)
    plist.add_argument("model", nargs="?", default="")
    plist.set_defaults(func=_price_list)
