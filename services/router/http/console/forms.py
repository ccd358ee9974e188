"""Console forms read by the `autoglm` CLI's own argument parsers, so a form refuses what the command line
refuses with the message the CLI prints (`argument --amount: 'x' is not an amount like 2.5`), and builds
the same request the CLI sends; the domain then checks it as it checks a gRPC call."""

from __future__ import annotations

import argparse
from typing import Any, NoReturn

from services.cli.admin_commands import add_admin_commands
from services.cli.billing_commands import add_billing_commands
from services.common.errors import InvalidInput
from services.common.generation import TrafficClass
from services.router.auth.api_keys import NewApiKey


class _FormParser(argparse.ArgumentParser):
    """The CLI's parser, raising its message instead of printing it and exiting."""

    def error(self, message: str) -> NoReturn:
        raise InvalidInput(message)


def _parser() -> _FormParser:
    parser = _FormParser(prog="autoglm", add_help=False)
    sub = parser.add_subparsers(dest="command", required=True)
    add_admin_commands(sub)
    add_billing_commands(sub)
    return parser


def _text(doc: dict[str, Any], name: str) -> str:
    value = doc.get(name, "")
    if value is None:
        return ""
    if not isinstance(value, str | int | float):
        raise InvalidInput(f"{name} must be text", field=name)
    return str(value).strip()


def _options(doc: dict[str, Any], names: dict[str, str]) -> list[str]:
    """`--flag=value` for each form field that is filled in (the `=` keeps a value like -5 a value)."""
    return [f"--{flag}={_text(doc, field)}" for field, flag in names.items() if _text(doc, field)]


def new_key(doc: dict[str, Any]) -> NewApiKey:
    """A key form as `autoglm keys create` reads it."""
    argv = ["keys", "create", *_options(doc, {"tenant": "tenant", "name": "name", "rpm": "rpm", "tpm": "tpm",
                                               "traffic_class": "traffic-class"})]
    argv += [f"--model={m.strip()}" for m in _text(doc, "models").split(",") if m.strip()]
    args = _parser().parse_args(argv)
    return NewApiKey(tenant_id=args.tenant, name=args.name, allowed_models=tuple(args.model or ()),
                     requests_per_minute=args.rpm, tokens_per_minute=args.tpm,
                     traffic_class=TrafficClass[args.traffic_class.upper()])


def budget(doc: dict[str, Any], budget_id: str = "") -> dict[str, Any]:
    """A budget form as `autoglm budget set` reads it: the keyword arguments of `budget_message`."""
    argv = ["budget", "set", *_options(doc, {"tenant": "tenant", "key": "key", "tag": "tag", "amount": "amount",
                                              "tokens": "tokens", "period": "period", "tz": "tz",
                                              "webhook": "webhook", "currency": "currency"})]
    if doc.get("soft") in (True, "on", "true", "1"):
        argv.append("--soft")
    if budget_id:
        argv += [f"--id={budget_id}", "--update"]
    args = _parser().parse_args(argv)
    return {"tenant": args.tenant, "key": args.key, "tag": args.tag, "amount": args.amount, "tokens": args.tokens,
            "period": args.period, "tz": args.tz, "soft": args.soft, "webhook": args.webhook, "budget_id": args.id,
            "currency": args.currency}


def split(doc: dict[str, Any]) -> dict[str, int]:
    """A traffic split form: version → weight in per-mille (the registry checks the sum and the versions)."""
    weights = doc.get("weights")
    if not isinstance(weights, dict) or not weights:
        raise InvalidInput("weights must map each version to its share in per-mille", field="weights")
    out: dict[str, int] = {}
    for version, weight in weights.items():
        text = str(weight).strip()
        if not text.lstrip("-").isdigit():
            raise InvalidInput(f"the weight of version {str(version)[:64]!r} must be a whole number of per-mille "
                               f"(0..1000), got {text[:32]!r}", field="weights")
        out[str(version)] = int(text)
    return out
