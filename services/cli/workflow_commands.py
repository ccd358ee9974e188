"""`autoglm workflow run FILE.yaml | show ID | list | cancel ID`: workflows (DAGs of tasks and generations)
on the router.

A workflow file is SubmitWorkflowRequest in YAML (the proto's field names) with a few conveniences:
enum values may be written short and in any case (`kind: summarize`, `output_format: json`,
`traffic_class: batch`, `role: user`, `unit: sentences`), durations as "30s", and `deadline_in: 300s`
sets the deadline that long after submission. See examples/workflows/compare.yaml.
"""

from __future__ import annotations

import argparse
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import yaml
from google.protobuf import json_format

from autoglm.router.v1 import router_service_pb2 as pb2
from autoglm.router.v1 import router_service_pb2_grpc as router_grpc
from services.cli.client_commands import _add_connection, resolve_api_key
from services.cli.endpoint import router_target

ENUMS = {"kind": "TASK_KIND_", "output_format": "OUTPUT_FORMAT_", "traffic_class": "TRAFFIC_CLASS_",
         "role": "CHAT_ROLE_", "unit": "LENGTH_UNIT_", "state": "WORKFLOW_STATE_"}
RECONNECTS = 30
FINISHED = (pb2.WORKFLOW_STATE_SUCCEEDED, pb2.WORKFLOW_STATE_FAILED, pb2.WORKFLOW_STATE_CANCELLED)


def _enums(value: Any) -> Any:
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            prefix = ENUMS.get(key)
            if prefix and isinstance(item, str) and not item.upper().startswith(prefix):
                item = prefix + item.upper()
            out[key] = _enums(item)
        return out
    if isinstance(value, list):
        return [_enums(v) for v in value]
    return value


def _seconds(text: str) -> float:
    return float(str(text).strip().removesuffix("s"))


def load_request(path: Path, now: datetime | None = None) -> pb2.SubmitWorkflowRequest:
    """The SubmitWorkflowRequest a workflow file describes; SystemExit naming what is wrong."""
    try:
        doc = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as error:
        raise SystemExit(f"{path}: {error}") from None
    if not isinstance(doc, dict):
        raise SystemExit(f"{path}: a workflow file is a mapping with `nodes:` (see examples/workflows/)")
    doc = _enums(doc)
    if "deadline_in" in doc:
        at = (now or datetime.now(UTC)) + timedelta(seconds=_seconds(doc.pop("deadline_in")))
        doc["deadline"] = at.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    try:
        return json_format.ParseDict(doc, pb2.SubmitWorkflowRequest())
    except json_format.ParseError as error:
        raise SystemExit(f"{path}: {error}") from None


def _stub(args: argparse.Namespace) -> tuple[grpc.Channel, router_grpc.RouterServiceStub, list[tuple[str, str]]]:
    address, credentials = router_target(args.data_dir, args.router, args.ca_cert, args.plaintext)
    channel = grpc.secure_channel(address, credentials) if credentials else grpc.insecure_channel(address)
    return channel, router_grpc.RouterServiceStub(channel), [("authorization", f"Bearer {resolve_api_key(args)}")]


def _name(enum_value: int, enum: Any, prefix: str) -> str:
    return str(enum.Name(enum_value)).removeprefix(prefix).lower()


def _money(money: Any) -> str:
    return f"{money.micros / 1_000_000:.6f} {money.currency_code or 'USD'}"


def progress_line(nodes: dict[str, pb2.NodeStatus], reply: pb2.WatchWorkflowResponse, elapsed: float) -> str:
    counts = {"done": 0, "running": 0, "waiting": 0, "failed": 0}
    for node in nodes.values():
        if node.state == pb2.NODE_STATE_SUCCEEDED:
            counts["done"] += 1
        elif node.state == pb2.NODE_STATE_RUNNING:
            counts["running"] += 1
        elif node.state == pb2.NODE_STATE_WAITING:
            counts["waiting"] += 1
        else:
            counts["failed"] += 1
    parts = ", ".join(f"{v} {k}" for k, v in counts.items() if v or k != "failed")
    return (f"[{elapsed:6.1f}s] {parts} | {reply.usage.total_tokens} tokens, {_money(reply.cost)} | "
            f"{reply.node.id} {_name(reply.node.state, pb2.NodeState, 'NODE_STATE_')}")


def follow(stub: router_grpc.RouterServiceStub, workflow_id: str, metadata: list[tuple[str, str]],
           show: Any, nodes: dict[str, pb2.NodeStatus], reconnects: int = RECONNECTS) -> None:
    """Print each node change until the workflow ends; a lost connection (a router restarting, say: the
    workflow goes on without it) is watched again once the router answers."""
    while True:
        try:
            for change in stub.WatchWorkflow(pb2.WatchWorkflowRequest(workflow_id=workflow_id), metadata=metadata,
                                             wait_for_ready=True):
                nodes[change.node.id] = change.node
                show(change)
            return
        except grpc.RpcError as error:
            if error.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED) or not reconnects:
                raise
            reconnects -= 1
            print(f"(connection lost: {error.code().name}; watching again)", file=sys.stderr, flush=True)


def _results(workflow: pb2.Workflow) -> None:
    for node in workflow.nodes:
        state = _name(node.state, pb2.NodeState, "NODE_STATE_")
        times = ""
        if node.HasField("start_time") and node.HasField("end_time"):
            start = node.start_time.ToDatetime().strftime("%H:%M:%S.%f")[:-3]
            end = node.end_time.ToDatetime().strftime("%H:%M:%S.%f")[:-3]
            times = f", {start} -> {end}"
        print(f"\n## {node.id}: {state} (attempt {node.attempt}, {node.usage.total_tokens} tokens, "
              f"{_money(node.cost)}{times})")
        if node.error_code:
            print(f"error: {node.error_code}: {node.error_message}")
        if node.fields:
            print("fields: " + ", ".join(f"{k}={v!r}" for k, v in sorted(node.fields.items())))
        if node.output:
            print(node.output.strip())


def _run(args: argparse.Namespace) -> int:
    request = load_request(Path(args.file))
    if args.dry_run:
        request.dry_run = True
    channel, stub, metadata = _stub(args)
    with channel:
        try:
            reply = stub.SubmitWorkflow(request, metadata=metadata, timeout=30)
        except grpc.RpcError as error:
            print(f"error: {error.code().name}: {error.details()}", file=sys.stderr)
            return 1
        worst = reply.estimate
        cost = _money(worst.cost) if worst.HasField("cost") else "no price"
        print(f"worst case: {worst.prompt_tokens} prompt + {worst.completion_tokens} completion tokens, {cost}")
        if request.dry_run:
            return 0
        workflow_id = reply.workflow.workflow_id
        print(f"workflow {workflow_id}: {len(reply.workflow.nodes)} nodes", flush=True)
        started = time.monotonic()
        nodes: dict[str, pb2.NodeStatus] = {}
        try:
            follow(stub, workflow_id, metadata, lambda change: print(
                progress_line(nodes, change, time.monotonic() - started), flush=True), nodes)
            final = stub.GetWorkflow(pb2.GetWorkflowRequest(workflow_id=workflow_id), metadata=metadata,
                                     timeout=30, wait_for_ready=True).workflow
        except grpc.RpcError as error:
            print(f"error: {error.code().name}: {error.details()}", file=sys.stderr)
            return 1
    print(f"\nworkflow {workflow_id} {_name(final.state, pb2.WorkflowState, 'WORKFLOW_STATE_')}: "
          f"{final.usage.total_tokens} tokens, {_money(final.cost)}")
    _results(final)
    return 0 if final.state == pb2.WORKFLOW_STATE_SUCCEEDED else 1


def _show(args: argparse.Namespace) -> int:
    channel, stub, metadata = _stub(args)
    with channel:
        try:
            workflow = stub.GetWorkflow(pb2.GetWorkflowRequest(workflow_id=args.workflow_id), metadata=metadata,
                                        timeout=30).workflow
        except grpc.RpcError as error:
            print(f"error: {error.code().name}: {error.details()}", file=sys.stderr)
            return 1
    print(f"workflow {workflow.workflow_id} {workflow.name!r}: "
          f"{_name(workflow.state, pb2.WorkflowState, 'WORKFLOW_STATE_')}, {workflow.usage.total_tokens} tokens, "
          f"{_money(workflow.cost)}\n")
    print("```mermaid\n" + workflow.mermaid + "```")
    _results(workflow)
    return 0


def _list(args: argparse.Namespace) -> int:
    channel, stub, metadata = _stub(args)
    with channel:
        try:
            found = stub.ListWorkflows(pb2.ListWorkflowsRequest(page_size=args.limit), metadata=metadata,
                                       timeout=30).workflows
        except grpc.RpcError as error:
            print(f"error: {error.code().name}: {error.details()}", file=sys.stderr)
            return 1
    for w in found:
        print(f"{w.workflow_id}  {_name(w.state, pb2.WorkflowState, 'WORKFLOW_STATE_'):10} {len(w.nodes):3} nodes  "
              f"{w.usage.total_tokens:7} tokens  {_money(w.cost)}  {w.name}")
    return 0


def _cancel(args: argparse.Namespace) -> int:
    channel, stub, metadata = _stub(args)
    with channel:
        try:
            workflow = stub.CancelWorkflow(pb2.CancelWorkflowRequest(workflow_id=args.workflow_id),
                                           metadata=metadata, timeout=60).workflow
        except grpc.RpcError as error:
            print(f"error: {error.code().name}: {error.details()}", file=sys.stderr)
            return 1
    print(f"workflow {workflow.workflow_id} {_name(workflow.state, pb2.WorkflowState, 'WORKFLOW_STATE_')}: "
          f"{workflow.usage.total_tokens} tokens, {_money(workflow.cost)}")
    return 0


def add_workflow_commands(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    workflow = subparsers.add_parser("workflow", help="run and inspect workflows (DAGs of tasks and generations)")
    sub = workflow.add_subparsers(dest="workflow_command", required=True)
    run = sub.add_parser("run", help="submit a workflow file and follow it: done / running / waiting per node, "
                                     "tokens and cost so far")
    _add_connection(run)
    run.add_argument("file", help="workflow YAML (see examples/workflows/compare.yaml)")
    run.add_argument("--dry-run", action="store_true", help="only validate and print the worst-case cost")
    run.set_defaults(func=_run)
    show = sub.add_parser("show", help="a workflow's Mermaid graph and each node's result")
    _add_connection(show)
    show.add_argument("workflow_id")
    show.set_defaults(func=_show)
    listing = sub.add_parser("list", help="your workflows, newest first")
    _add_connection(listing)
    listing.add_argument("--limit", type=int, default=20)
    listing.set_defaults(func=_list)
    cancel = sub.add_parser("cancel", help="stop a workflow's running nodes and skip the rest")
    _add_connection(cancel)
    cancel.add_argument("workflow_id")
    cancel.set_defaults(func=_cancel)
