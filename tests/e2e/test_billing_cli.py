"""A user runs billing as a process, or the whole mesh with `autoglm up`, and drives it with the `autoglm`
billing commands."""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc

from autoglm.billing.v1 import billing_service_pb2 as pb2
from autoglm.billing.v1 import billing_service_pb2_grpc as pb2_grpc
from services.cli.billing_commands import add_billing_commands
from services.cli.endpoint import billing_token, load_endpoint, operator_channel
from tests.conftest import tool
from tests.e2e.mesh_process import start_mesh, stop_mesh
from tests.integration.billing.helpers import usage
from tests.integration.billing.procs import start_billing, wait_port

CLI = """
import argparse, sys
from services.cli.billing_commands import add_billing_commands
parser = argparse.ArgumentParser(prog="autoglm")
add_billing_commands(parser.add_subparsers(dest="command", required=True))
args = parser.parse_args(sys.argv[1:])
sys.exit(args.func(args))
"""


def autoglm(address: str, data_dir: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    # `autoglm` itself wires these commands in; this runs exactly the same parser functions. The operator
    # token is the one billing made in its data dir.
    return subprocess.run([sys.executable, "-c", CLI, *argv[:2], "--billing", address, "--data-dir", str(data_dir),
                           *argv[2:]], capture_output=True, text=True, timeout=60,
                          cwd=Path(__file__).resolve().parents[2])


async def test_price_budget_and_report_commands(tmp_path: Path, processes) -> None:
    proc, port_file = start_billing(f"sqlite:///{tmp_path / 'b.db'}", tmp_path, "cli")
    processes.append(proc)
    address = wait_port(proc, port_file)
    assert autoglm(address, tmp_path, "price", "set", "smollm2", "--input", "2", "--output", "6.5",
                   "--effective", "2020-01-01T00:00:00+00:00").returncode == 0
    listed = autoglm(address, tmp_path, "price", "list", "--format", "json")
    assert json.loads(listed.stdout)[0]["output/M"] == "6.500000"
    made = autoglm(address, tmp_path, "budget", "set", "--tenant", "acme", "--amount", "0.01", "--period", "daily")
    assert made.returncode == 0, made.stderr
    async with grpc.aio.insecure_channel(address) as chan:
        stub = pb2_grpc.BillingServiceStub(chan)
        for i, model_key in enumerate(["k1", "k1", "k2"]):
            await stub.RecordUsage(pb2.RecordUsageRequest(event=usage(f"c{i}", prompt=1000, completion=1000,
                                                                      key=model_key)))
    report = autoglm(address, tmp_path, "billing", "report", "--by", "api_key", "--since", "1d", "--format", "csv")
    assert report.returncode == 0, report.stderr
    lines = report.stdout.strip().splitlines()
    assert lines[0] == "api_key,requests,prompt_tokens,completion_tokens,cost,anomalous"
    assert lines[1:] == ["k1,2,2000,2000,0.017000,", "k2,1,1000,1000,0.008500,"]
    assert autoglm(address, tmp_path, "budget", "set", "--tenant", "beta", "--amount", "1").returncode == 0
    async with grpc.aio.insecure_channel(address) as chan:  # a router holds a lease and a request a hold
        stub = pb2_grpc.BillingServiceStub(chan)
        await stub.Reserve(pb2.ReserveRequest(tenant_id="beta", model="smollm2", max_prompt_tokens=1000,
                                              max_completion_tokens=1000))
        await stub.AcquireLeases(pb2.AcquireLeasesRequest(router_id="router-0", tenant_id="beta"))
    budgets = autoglm(address, tmp_path, "budget", "list", "--format", "json")
    rows = {row["scope"]: row for row in json.loads(budgets.stdout)}
    assert (rows["tenant acme"]["spent"], rows["tenant acme"]["limit"], rows["tenant acme"]["level"]) == \
        ("0.025500", "0.010000", "EMERGENCY")
    assert (rows["tenant beta"]["held"], rows["tenant beta"]["leased"]) == ("0.008500", "0.010000")
    # 85 % after the first event (WARNING), 170 % after the second (CRITICAL, then EMERGENCY), each with its time
    fired = [part.split(" ") for part in rows["tenant acme"]["fired"].split(", ")]
    assert [level for level, _ in fired] == ["WARNING", "CRITICAL", "EMERGENCY"]
    times = [datetime.fromisoformat(at.replace("Z", "+00:00")) for _, at in fired]
    assert times == sorted(times) and all(abs(datetime.now(UTC) - t) < timedelta(minutes=10) for t in times)
    assert rows["tenant beta"]["fired"] == ""
    bad = autoglm(address, tmp_path, "budget", "set", "--amount", "1")
    assert bad.returncode == 1 and "INVALID_ARGUMENT" in bad.stderr and "tenant_id is required" in bad.stderr


def test_commands_register_on_a_parser() -> None:
    parser = argparse.ArgumentParser()
    add_billing_commands(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["billing", "report", "--by", "model", "--since", "7d"])
    assert (args.by, args.since, args.billing) == (["model"], "7d", None)  # None: the local mesh's endpoint


def test_billing_commands_work_unchanged_against_the_launcher_mesh(tmp_path: Path, processes) -> None:
    """`autoglm up` (make run) hands the billing commands their operator token through the data dir: they
    work as before, while a call to billing's operator port without it is refused."""
    mesh = start_mesh(tmp_path, processes)

    def cli(*argv: str) -> subprocess.CompletedProcess[str]:
        leaf = 1 if argv[0] == "usage" else 2
        return subprocess.run([tool("autoglm"), *argv[:leaf], "--data-dir", str(mesh.data_dir), *argv[leaf:]],
                              capture_output=True, text=True, timeout=60)

    prices = cli("price", "list", "--format", "json")
    assert prices.returncode == 0, prices.stderr
    assert [p["model"] for p in json.loads(prices.stdout)] == ["smollm2-135m-instruct"]  # seeded by autoglm up
    made = cli("budget", "set", "--tenant", "demo", "--amount", "5", "--period", "monthly", "--actor", "alice")
    assert made.returncode == 0, made.stderr
    listed = cli("budget", "list", "--format", "json")
    assert listed.returncode == 0 and json.loads(listed.stdout)[0]["id"] == made.stdout.strip()
    report = cli("billing", "report", "--by", "model", "--format", "json")
    assert report.returncode == 0, report.stderr
    usage_report = cli("usage", "--format", "json")
    assert usage_report.returncode == 0, usage_report.stderr

    async def raw() -> tuple[grpc.StatusCode, str, list[pb2.AuditEvent]]:
        billing = load_endpoint(mesh.data_dir).billing
        async with grpc.aio.insecure_channel(billing) as chan:
            try:
                await pb2_grpc.BillingServiceStub(chan).ListBudgets(pb2.ListBudgetsRequest(), timeout=10)
                refused = (grpc.StatusCode.OK, "")
            except grpc.aio.AioRpcError as err:
                refused = (err.code(), err.details() or "")
        async with operator_channel(billing, billing_token(mesh.data_dir)) as chan:
            events = await pb2_grpc.BillingServiceStub(chan).ListAuditEvents(
                pb2.ListAuditEventsRequest(action="budget.create"), timeout=10)
        return refused[0], refused[1], list(events.events)

    code, details, events = asyncio.run(raw())
    assert code == grpc.StatusCode.UNAUTHENTICATED and "billing operator" in details
    assert [(e.actor, json.loads(e.details_json)["claimed_actor"]) for e in events] == [("operator-token", "alice")]
    assert stop_mesh(mesh) == 0
