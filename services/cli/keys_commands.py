"""`autoglm keys create|list|revoke` — API keys over the router's AdminService.

The admin token comes from --admin-token, $AUTOGLM_ADMIN_TOKEN, or the router's data dir file.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from pathlib import Path

import grpc
from google.protobuf.json_format import MessageToDict

from autoglm.router.v1 import admin_service_pb2 as admin_pb2
from autoglm.router.v1 import admin_service_pb2_grpc as admin_grpc

_CLASSES = {"core": 1, "interactive": 2, "batch": 3}


def _token(args: argparse.Namespace) -> str:
    if args.admin_token:
        return str(args.admin_token)
    if os.environ.get("AUTOGLM_ADMIN_TOKEN"):
        return os.environ["AUTOGLM_ADMIN_TOKEN"]
    path = Path(args.data_dir) / "router" / "admin_token"
    if path.exists():
        return path.read_text().strip()
    raise SystemExit(f"no admin token: pass --admin-token, set AUTOGLM_ADMIN_TOKEN, or run the router ({path})")


async def _call(args: argparse.Namespace) -> dict[str, object]:
    metadata = [("authorization", f"Bearer {_token(args)}")]
    async with grpc.aio.insecure_channel(args.router) as channel:
        stub = admin_grpc.AdminServiceStub(channel)
        if args.keys_command == "create":
            reply = await stub.CreateApiKey(admin_pb2.CreateApiKeyRequest(
                tenant_id=args.tenant, name=args.name, allowed_models=args.model or [],
                limits=admin_pb2.KeyLimits(requests_per_minute=args.rpm, tokens_per_minute=args.tpm),
                traffic_class=_CLASSES[args.traffic_class],  # type: ignore[arg-type]
            ), metadata=metadata, timeout=10)
        elif args.keys_command == "list":
            reply = await stub.ListApiKeys(admin_pb2.ListApiKeysRequest(
                tenant_id=args.tenant or "", include_revoked=args.include_revoked), metadata=metadata, timeout=10)
        else:
            reply = await stub.RevokeApiKey(admin_pb2.RevokeApiKeyRequest(key_id=args.key_id),
                                            metadata=metadata, timeout=10)
    return MessageToDict(reply, preserving_proto_field_name=True)


def _run(args: argparse.Namespace) -> int:
    try:
        result = asyncio.run(_call(args))
    except grpc.aio.AioRpcError as exc:
        print(f"error: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    print(json.dumps(result, indent=2))
    return 0


def add_keys_commands(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    keys = subparsers.add_parser("keys", help="create, list and revoke API keys (router AdminService)")
    keys.add_argument("--router", default="127.0.0.1:50051", help="router host:port")
    keys.add_argument("--admin-token", default="", help="admin token (default: $AUTOGLM_ADMIN_TOKEN or data dir)")
    keys.add_argument("--data-dir", default=".autoglm", help="mesh data dir holding router/admin_token")
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
