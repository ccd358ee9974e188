"""`autoglm keys create|list|revoke`, `autoglm audit` and `autoglm models history|set-state` — the router's
AdminService from a shell (`autoglm audit --source all|billing` reads billing's audit log too, with its
operator token, and merges both newest first).

They reach the local mesh's router (TLS with its CA, from `<data dir>/endpoint.json`) unless told
otherwise. The admin token comes from --admin-token, $AUTOGLM_ADMIN_TOKEN, or the router's data dir.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import getpass
import json
import os
import sys
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.json_format import MessageToDict

from autoglm.billing.v1 import billing_service_pb2 as billing_pb2
from autoglm.billing.v1 import billing_service_pb2_grpc as billing_grpc
from autoglm.common.v1 import generation_pb2
from autoglm.router.v1 import admin_service_pb2 as admin_pb2
from autoglm.router.v1 import admin_service_pb2_grpc as admin_grpc
from autoglm.router.v1 import model_lifecycle_pb2 as lifecycle_pb2
from services.cli.endpoint import billing_token, load_endpoint, operator_channel, router_target
from services.common.audit_timeline import CHOICES, Fetch, TimelineEvent, details_of, timeline_page

_CLASSES = {name.removeprefix("TRAFFIC_CLASS_").lower(): value
            for name, value in generation_pb2.TrafficClass.items() if value}  # core, interactive, batch
AUDIT_PAGE = 100
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _token(args: argparse.Namespace) -> str:
    if args.admin_token:
        return str(args.admin_token)
    if os.environ.get("AUTOGLM_ADMIN_TOKEN"):
        return os.environ["AUTOGLM_ADMIN_TOKEN"]
    path = Path(args.data_dir) / "router" / "admin_token"
    if path.exists():
        return path.read_text().strip()
    raise SystemExit(f"no admin token: pass --admin-token, set AUTOGLM_ADMIN_TOKEN, or run the router ({path})")


def _admin_channel(args: argparse.Namespace) -> tuple[grpc.aio.Channel, list[tuple[str, str]]]:
    address, credentials = router_target(args.data_dir, args.router, args.ca_cert, args.plaintext)
    metadata = [("authorization", f"Bearer {_token(args)}")]
    channel = (grpc.aio.secure_channel(address, credentials) if credentials is not None
               else grpc.aio.insecure_channel(address))
    return channel, metadata


async def _with_admin(args: argparse.Namespace,
                      call: Callable[[admin_grpc.AdminServiceStub, list[tuple[str, str]]], Awaitable[Any]]) -> Any:
    channel, metadata = _admin_channel(args)
    async with channel:
        return await call(admin_grpc.AdminServiceStub(channel), metadata)


async def _keys(args: argparse.Namespace) -> dict[str, object]:
    async def call(stub: admin_grpc.AdminServiceStub, metadata: list[tuple[str, str]]) -> Any:
        if args.keys_command == "create":
            return await stub.CreateApiKey(admin_pb2.CreateApiKeyRequest(
                tenant_id=args.tenant, name=args.name, allowed_models=args.model or [],
                limits=admin_pb2.KeyLimits(requests_per_minute=args.rpm, tokens_per_minute=args.tpm),
                traffic_class=_CLASSES[args.traffic_class],  # type: ignore[arg-type]
            ), metadata=metadata, timeout=10)
        if args.keys_command == "list":
            return await stub.ListApiKeys(admin_pb2.ListApiKeysRequest(
                tenant_id=args.tenant or "", include_revoked=args.include_revoked), metadata=metadata, timeout=10)
        return await stub.RevokeApiKey(admin_pb2.RevokeApiKeyRequest(key_id=args.key_id),
                                       metadata=metadata, timeout=10)

    return MessageToDict(await _with_admin(args, call), preserving_proto_field_name=True)


async def _audit(args: argparse.Namespace) -> list[dict[str, object]]:
    """Newest first, following page tokens until --limit events (0: all of them): the router's log, billing's,
    or both merged into one timeline (`services/common/audit_timeline.py`, as the console's Audit page)."""
    async with contextlib.AsyncExitStack() as stack:
        logs: dict[str, Fetch] = {}
        if args.source in ("all", "router"):
            channel, metadata = _admin_channel(args)
            await stack.enter_async_context(channel)
            logs["router"] = _router_log(admin_grpc.AdminServiceStub(channel), metadata)
        if args.source in ("all", "billing"):
            billing = await stack.enter_async_context(operator_channel(
                args.billing or load_endpoint(args.data_dir).billing, billing_token(args.data_dir, args.operator_token)))
            logs["billing"] = _billing_log(billing_grpc.BillingServiceStub(billing))
        return await _timeline(args, logs)


def _router_log(stub: admin_grpc.AdminServiceStub, metadata: list[tuple[str, str]]) -> Fetch:
    async def fetch(action: str, size: int, token: str) -> tuple[list[TimelineEvent], str]:
        page = await stub.ListAuditEvents(admin_pb2.ListAuditEventsRequest(
            action=action, page_size=size, page_token=token), metadata=metadata, timeout=10)
        return [TimelineEvent(e.time.ToMicroseconds(), "router", e.sequence, e.actor, e.action, e.target,
                              _whole_numbers(MessageToDict(e.details))) for e in page.events], page.next_page_token
    return fetch


def _billing_log(stub: billing_grpc.BillingServiceStub) -> Fetch:
    async def fetch(action: str, size: int, token: str) -> tuple[list[TimelineEvent], str]:
        page = await stub.ListAuditEvents(billing_pb2.ListAuditEventsRequest(
            action=action, page_size=size, page_token=token), timeout=10)
        return [TimelineEvent(e.time.ToMicroseconds(), "billing", int(e.audit_id or 0), e.actor, e.action, e.target,
                              details_of(e.details_json)) for e in page.events], page.next_page_token
    return fetch


async def _timeline(args: argparse.Namespace, logs: dict[str, Fetch]) -> list[dict[str, object]]:
    events: list[dict[str, object]] = []
    token = ""
    while True:
        want = AUDIT_PAGE if not args.limit else min(AUDIT_PAGE, args.limit - len(events))
        page, token = await timeline_page(logs, args.action, want, token, args.source)
        events += [{"source": e.source, "sequence": str(e.sequence),
                    "time": (EPOCH + timedelta(microseconds=e.time_us)).isoformat().replace("+00:00", "Z"),
                    "actor": e.actor, "action": e.action, "target": e.target, "details": e.details} for e in page]
        if not token or (args.limit and len(events) >= args.limit):
            return events


STATES = ("DRAFT", "PENDING_APPROVAL", "ACTIVE", "DEPRECATED", "RETIRED")
_STATE_PREFIX = "VERSION_STATE_"


async def _model_admin(args: argparse.Namespace) -> dict[str, object]:
    """`history MODEL` reads the model (GetModel); `set-state MODEL@VERSION STATE` moves a version."""
    async def call(stub: admin_grpc.AdminServiceStub, metadata: list[tuple[str, str]]) -> Any:
        if args.models_command == "history":
            return await stub.GetModel(admin_pb2.GetModelRequest(model=args.name), metadata=metadata, timeout=10)
        name, sep, version = args.target.partition("@")
        if not sep or not name or not version:
            raise SystemExit(f"set-state needs MODEL@VERSION, got {args.target!r}")
        return await stub.SetVersionState(admin_pb2.SetVersionStateRequest(
            model=name, version=version, state=lifecycle_pb2.VersionState.Value(_STATE_PREFIX + args.state),
            operator=args.operator, reason=args.reason), metadata=metadata, timeout=10)

    reply = await _with_admin(args, call)
    model: dict[str, object] = MessageToDict(reply.model, preserving_proto_field_name=True)
    for version in model.get("versions", []):  # type: ignore[attr-defined]
        version["state"] = version.get("state", "").removeprefix(_STATE_PREFIX)
        for change in version.get("history", []):
            change["to_state"] = change.get("to_state", "").removeprefix(_STATE_PREFIX)
            change["from_state"] = change.get("from_state", "").removeprefix(_STATE_PREFIX)
    return model


def _model_text(model: dict[str, Any]) -> str:
    lines = [str(model.get("name", ""))]
    for version in model.get("versions", []):
        stable = "  stable" if version.get("stable") else ""
        lines.append(f"  {version['version']}  {version['state']}  weight {version.get('weight_permille', 0)}/1000"
                     f"{stable}")
        for change in version.get("history", []):
            move = (f"{change['from_state']} -> {change['to_state']}" if change["from_state"]
                    else f"registered {change['to_state']}")
            lines.append(f"    {change.get('time', '')}  {move}  by {change.get('operator', '')}: "
                         f"{change.get('reason', '')}")
    return "\n".join(lines)


def _whole_numbers(value: Any) -> Any:
    """Struct numbers arrive as doubles: a limit of 600 reads 600, not 600.0."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {k: _whole_numbers(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_whole_numbers(v) for v in value]
    return value


def _text(events: list[dict[str, object]], with_source: bool = False) -> str:
    lines = []
    for event in events:
        details = json.dumps(event.get("details", {}), sort_keys=True, separators=(",", ":"))
        source = f"{event.get('source', ''):<7}  " if with_source else ""
        lines.append(f"{event.get('time', '')}  {source}{event.get('actor', '')}  {event.get('action', '')}  "
                     f"{event.get('target', '')}  {details}")
    return "\n".join(lines)


def _run(args: argparse.Namespace) -> int:
    try:
        if args.command == "audit":
            events = asyncio.run(_audit(args))
            print(json.dumps(events, indent=2) if args.format == "json" else _text(events, args.source == "all"))
        elif args.command == "models":
            model = asyncio.run(_model_admin(args))
            print(json.dumps(model, indent=2) if args.format == "json" else _model_text(model))
        else:
            print(json.dumps(asyncio.run(_keys(args)), indent=2))
    except grpc.aio.AioRpcError as exc:
        print(f"error: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    return 0


def _add_router_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--router", default=None, help="router host:port (default: the local mesh's)")
    parser.add_argument("--ca-cert", default=None, help="CA of the router's TLS certificate (default: the local mesh's)")
    parser.add_argument("--plaintext", action="store_true", help="connect without TLS")
    parser.add_argument("--admin-token", default="", help="admin token (default: $AUTOGLM_ADMIN_TOKEN or data dir)")
    parser.add_argument("--data-dir", default=".autoglm", help="mesh data dir (endpoint.json, router/admin_token)")


def add_admin_commands(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    keys = subparsers.add_parser("keys", help="create, list and revoke API keys (router AdminService)")
    _add_router_options(keys)
    sub = keys.add_subparsers(dest="keys_command", required=True)
    create = sub.add_parser("create", help="create a key; its secret is printed once")
    create.add_argument("--tenant", required=True)
    create.add_argument("--name", default="")
    create.add_argument("--model", action="append", help="allowed model (repeatable; default: all)")
    create.add_argument("--rpm", type=int, default=0, help="requests per minute (0 = no limit)")
    create.add_argument("--tpm", type=int, default=0, help="tokens per minute (0 = no limit)")
    create.add_argument("--traffic-class", choices=sorted(_CLASSES), default="interactive")
    listing = sub.add_parser("list", help="list keys (never secrets)")
    listing.add_argument("--tenant", default="")
    listing.add_argument("--include-revoked", action="store_true")
    revoke = sub.add_parser("revoke", help="revoke a key by id")
    revoke.add_argument("key_id")
    keys.set_defaults(func=_run)

    audit = subparsers.add_parser(
        "audit", help="the router's audit log, newest first: keys created and revoked, policies, model "
                      "registrations, traffic splits, promotions and rollbacks (automatic ones with their reason); "
                      "with --source all or billing, billing's too: price and budget changes, denied spend")
    _add_router_options(audit)
    audit.add_argument("--source", choices=CHOICES, default="router",
                       help="whose log: the router's (the default), billing's, or all, merged newest first")
    audit.add_argument("--billing", default=None, help="billing's operator address (default: the local mesh's)")
    audit.add_argument("--operator-token", default=None,
                       help="billing's operator token (default: $AUTOGLM_BILLING_TOKEN, else the data dir's)")
    audit.add_argument("--action", default="", help="only this action, e.g. model.rollback or key.revoke")
    audit.add_argument("--limit", type=int, default=50, help="at most this many events (0 = all)")
    audit.add_argument("--format", choices=["text", "json"], default="text")
    audit.set_defaults(func=_run)


def add_model_admin_commands(models: argparse.ArgumentParser) -> None:
    """`autoglm models history|set-state` (with the admin token), under the user's `autoglm models`."""
    sub = models.add_subparsers(dest="models_command", metavar="{history,set-state}")
    history = sub.add_parser("history", help="a model's versions with their state, split and every move "
                                             "(who, when, why); needs the admin token")
    _add_router_options(history)
    history.add_argument("name", help="the model")
    history.add_argument("--format", choices=["text", "json"], default="text")
    history.set_defaults(func=_run)
    move = sub.add_parser(
        "set-state", help="move a version: DRAFT -> PENDING_APPROVAL -> ACTIVE -> DEPRECATED -> RETIRED (also "
                          "PENDING_APPROVAL -> DRAFT, ACTIVE -> PENDING_APPROVAL, DEPRECATED -> ACTIVE, and "
                          "DRAFT or PENDING_APPROVAL -> RETIRED); needs the admin token")
    _add_router_options(move)
    move.add_argument("target", metavar="MODEL@VERSION")
    move.add_argument("state", choices=STATES, type=str.upper)
    move.add_argument("--reason", required=True, help="why (kept in the version's history and the audit log)")
    move.add_argument("--operator", default=getpass.getuser(),
                      help="who makes the move (default: your login name)")
    move.add_argument("--format", choices=["text", "json"], default="text")
    move.set_defaults(func=_run)
