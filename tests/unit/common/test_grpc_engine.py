"""Every service and sidecar process runs grpc on the iomgr polling path unless the operator chose GRPC_EXPERIMENTS."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from services.common.grpc_engine import IOMGR_EXPERIMENTS

ROOT = Path(__file__).resolve().parents[3]
# grpc is already loaded when the sidecar's CLI entry runs (`autoglm sidecar run`): it must re-execute.
PROBE = ("import os, grpc; from services.common.grpc_engine import prefer_iomgr_polling; prefer_iomgr_polling(); "
         "print(os.getpid(), os.environ['GRPC_EXPERIMENTS'])")


def run_probe(env: dict[str, str]) -> tuple[str, str]:
    done = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=60, check=True)
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 1, done.stdout  # printed once: by the re-executed process, not before the exec
    pid, value = lines[0].split(" ", 1)
    return pid, value


def test_unset_experiments_are_set_and_the_process_re_executes() -> None:
    env = {k: v for k, v in os.environ.items() if k != "GRPC_EXPERIMENTS"}
    _pid, value = run_probe(env)
    assert value == IOMGR_EXPERIMENTS


def test_the_operators_choice_wins() -> None:
    env = {**os.environ, "GRPC_EXPERIMENTS": "-event_engine_client"}
    _pid, value = run_probe(env)
    assert value == "-event_engine_client"
