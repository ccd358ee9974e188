"""A user runs billing as a process and drives it with the `autoglm` billing commands."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import grpc

from autoglm.billing.v1 import billing_service_pb2 as pb2
from autoglm.billing.v1 import billing_service_pb2_grpc as pb2_grpc
from services.cli.billing_commands import add_billing_commands
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


def autoglm(address: str, *argv: str) -> subprocess.CompletedProcess[str]:
    # `autoglm` itself wires these commands in; this runs exactly the same parser functions.
    return subprocess.run([sys.executable, "-c", CLI, *argv[:2], "--billing", address, *argv[2:]],
                          capture_output=True, text=True, timeout=60, cwd=Path(__file__).resolve().parents[2])


async def test_price_budget_and_report_commands(tmp_path: Path, processes) -> None:
    proc, port_file = start_billing(f"sqlite:///{tmp_path / 'b.db'}", tmp_path, "cli")
    processes.append(proc)
    address = wait_port(proc, port_file)
    assert autoglm(address, "price", "set", "smollm2", "--input", "2", "--output", "6.5",
                   "--effective", "2020-01-01T00:00:00+00:00").returncode == 0
    listed = autoglm(address, "price", "list", "--format", "json")
    assert json.loads(listed.stdout)[0]["output/M"] == "6.500000"
    made = autoglm(address, "budget", "set", "--tenant", "acme", "--amount", "0.01", "--period", "daily")
    assert made.returncode == 0, made.stderr
    async with grpc.aio.insecure_channel(address) as chan:
        stub = pb2_grpc.BillingServiceStub(chan)
        for i, model_key in enumerate(["k1", "k1", "k2"]):
            await stub.RecordUsage(pb2.RecordUsageRequest(event=usage(f"c{i}", prompt=1000, completion=1000,
                                                                      key=model_key)))
    report = autoglm(address, "billing", "report", "--by", "api_key", "--since", "1d", "--format", "csv")
    assert report.returncode == 0, report.stderr
    lines = report.stdout.strip().splitlines()
    assert lines[0] == "api_key,requests,prompt_tokens,completion_tokens,cost,anomalous"
    assert lines[1:] == ["k1,2,2000,2000,0.017000,", "k2,1,1000,1000,0.008500,"]
    budgets = autoglm(address, "budget", "list", "--format", "json")
    (row,) = json.loads(budgets.stdout)
    assert (row["spent"], row["limit"], row["level"]) == ("0.025500", "0.010000", "EMERGENCY")
    bad = autoglm(address, "budget", "set", "--amount", "1")
    assert bad.returncode == 1 and "INVALID_ARGUMENT" in bad.stderr and "tenant_id is required" in bad.stderr


def test_commands_register_on_a_parser() -> None:
    parser = argparse.ArgumentParser()
    add_billing_commands(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["billing", "report", "--by", "model", "--since", "7d"])
    assert (args.by, args.since, args.billing) == (["model"], "7d", None)  # None: the local mesh's endpoint
