"""A user runs `autoglm up`, then the example workflow with `autoglm workflow run` through the router's TLS
sidecar with the demo key, looks at it with `autoglm workflow show`, and sees its cost per node with
`autoglm billing report --by tag --tag-key workflow_node`."""

from __future__ import annotations

import csv
import io
import re
import subprocess
from pathlib import Path

from tests.conftest import ROOT, tool
from tests.e2e.mesh_process import start_mesh, stop_mesh
from tests.settlement import router_backlog
from tests.waiting import wait_until

NODES = {"offer_a", "offer_b", "offer_c", "compare", "verdict"}


async def test_the_example_workflow_runs_and_is_billed_per_node_on_the_launcher_mesh(tmp_path: Path,
                                                                                     processes) -> None:
    mesh = start_mesh(tmp_path, processes)
    assert mesh.tls

    def cli(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([tool("autoglm"), *argv, "--data-dir", str(mesh.data_dir)], capture_output=True,
                              text=True, timeout=600, cwd=ROOT)

    run = cli("workflow", "run", "examples/workflows/compare.yaml")
    assert run.returncode == 0, run.stdout + run.stderr
    workflow_id = re.search(r"^workflow (wf_\w+): 5 nodes$", run.stdout, re.MULTILINE)
    assert workflow_id, run.stdout
    assert "3 running" in run.stdout and f"workflow {workflow_id.group(1)} succeeded" in run.stdout

    shown = cli("workflow", "show", workflow_id.group(1))
    assert shown.returncode == 0, shown.stderr
    assert "```mermaid\nflowchart TD" in shown.stdout and "offer_a<br/>SUMMARIZE · succeeded" in shown.stdout

    listed = cli("workflow", "list")
    assert workflow_id.group(1) in listed.stdout and "succeeded" in listed.stdout

    await wait_until(lambda: router_backlog(mesh.data_dir / "router") == 0, 60, "the router to settle usage")

    def per_node() -> dict[str, str] | None:
        report = subprocess.run([tool("autoglm"), "billing", "report", "--data-dir", str(mesh.data_dir), "--by",
                                 "tag", "--tag-key", "workflow_node", "--since", "1h", "--format", "csv"],
                                capture_output=True, text=True, timeout=60, cwd=ROOT)
        assert report.returncode == 0, report.stderr
        rows = {row["tag"]: row["requests"] for row in csv.DictReader(io.StringIO(report.stdout))}
        return rows if set(rows) >= NODES else None

    rows = await wait_until(per_node, 60, "billing to report every node")
    assert {node: rows[node] for node in NODES} == dict.fromkeys(NODES, "1")
    assert stop_mesh(mesh) == 0
