"""`autoglm chat`, `autoglm generate` and `autoglm models`: talk to the router as a user would.

The API key comes from --api-key, $AUTOGLM_API_KEY, or the demo key `autoglm up` writes into its
data dir (`.autoglm/demo_api_key`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import uuid
from pathlib import Path

import grpc

from services.cli.admin_commands import add_model_admin_commands
from services.cli.endpoint import router_target
from services.client import GLMClient


def resolve_api_key(args: argparse.Namespace) -> str:
    if args.api_key:
        return str(args.api_key)
    if os.environ.get("AUTOGLM_API_KEY"):
        return os.environ["AUTOGLM_API_KEY"]
    demo = Path(args.data_dir) / "demo_api_key"
    if demo.exists():
        return demo.read_text().strip()
    raise SystemExit("no API key: pass --api-key, set AUTOGLM_API_KEY, or start the mesh with `make run`")


def _add_connection(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--router", default=None, help="router address (default: the local mesh's, else 127.0.0.1:50051)")
    parser.add_argument("--ca-cert", default=None, help="CA of the router's TLS certificate (default: the local mesh's)")
    parser.add_argument("--plaintext", action="store_true", help="connect without TLS")
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--data-dir", default=".autoglm", help="mesh data dir holding the demo key")


def _add_common(parser: argparse.ArgumentParser) -> None:
    _add_connection(parser)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=None,
                        help="default: the model version's default sampling (autoglm models shows it)")
    parser.add_argument("--seed", type=int, default=None)


def open_client(args: argparse.Namespace) -> GLMClient:
    router, credentials = router_target(args.data_dir, args.router, args.ca_cert, args.plaintext)
    return GLMClient(resolve_api_key(args), router, credentials=credentials, model=args.model)


def _stream(client: GLMClient, prompt: str, args: argparse.Namespace, context_id: str = "") -> int:
    try:
        summary = None
        for delta in client.generate(prompt, context_id=context_id, max_tokens=args.max_tokens,
                                     temperature=args.temperature, seed=args.seed, model=args.model):
            sys.stdout.write(delta.text)
            sys.stdout.flush()
            summary = delta.summary or summary
    except grpc.RpcError as error:
        print(f"\nerror: {error.code().name}: {error.details()}", file=sys.stderr)
        return 1
    sys.stdout.write("\n")
    if summary is not None:
        print(
            f"[{summary.prompt_tokens} prompt + {summary.completion_tokens} completion tokens, "
            f"cost {summary.cost}, {summary.finish_reason.removeprefix('FINISH_REASON_').lower()}"
            f"{', cached' if summary.cached else ''}, {summary.model}@{summary.model_version}]",
            file=sys.stderr, flush=True,
        )
    return 0


def _generate(args: argparse.Namespace) -> int:
    prompt = " ".join(args.prompt) if args.prompt else sys.stdin.read()
    with open_client(args) as client:
        return _stream(client, prompt, args, args.context_id)


def _chat(args: argparse.Namespace) -> int:
    context_id = args.context_id or f"chat-{uuid.uuid4().hex[:12]}"
    print(f"chatting with {args.model} (context {context_id}); an empty line or Ctrl-D ends", file=sys.stderr)
    status = 0
    with open_client(args) as client:
        while True:
            try:
                if sys.stdin.isatty():
                    line = input("you> ")
                else:
                    line = sys.stdin.readline()
                    if not line:
                        break
                    line = line.rstrip("\n")
            except (EOFError, KeyboardInterrupt):
                break
            if not line.strip():
                break
            if sys.stdin.isatty():
                sys.stdout.write("model> ")
            status = _stream(client, line, args, context_id) or status
    return status


def _models(args: argparse.Namespace) -> int:
    try:
        with open_client(args) as client:
            models = client.models()
    except grpc.RpcError as error:
        print(f"error: {error.code().name}: {error.details()}", file=sys.stderr)
        return 1
    if args.format == "json":
        print(json.dumps(models, indent=2))
        return 0
    for model in models:
        print(f"{model['name']}  (context window {model['context_window']} tokens, "
              f"default version {model['default_version']})")
        for version in model["versions"]:  # type: ignore[attr-defined]
            defaults = version.get("default_sampling") or {}
            shown = ", ".join(f"{k} {v:g}" for k, v in defaults.items()) or "none (unset temperature is greedy)"
            state = str(version.get("state", "")).removeprefix("VERSION_STATE_")
            print(f"  {version['version']}  {state}  weight {version['weight_permille']}/1000  "
                  f"healthy replicas {version['healthy_replicas']}  default sampling: {shown}")
    return 0


def add_client_commands(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    chat = subparsers.add_parser("chat", help="interactive chat that remembers the conversation (context_id)")
    _add_common(chat)
    chat.add_argument("--context-id", default="", help="continue this conversation (default: a new one)")
    chat.set_defaults(func=_chat)

    generate = subparsers.add_parser("generate", help="stream one answer to a prompt (argument or stdin)")
    _add_common(generate)
    generate.add_argument("--context-id", default="")
    generate.add_argument("prompt", nargs="*")
    generate.set_defaults(func=_generate)

    models = subparsers.add_parser("models", help="the models your key may call: versions with their state, "
                                                  "traffic split and default sampling")
    _add_connection(models)
    models.set_defaults(model="")
    models.add_argument("--format", choices=["text", "json"], default="text")
    models.set_defaults(func=_models)
    add_model_admin_commands(models)
