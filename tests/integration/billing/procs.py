"""Start billing as a real `python -m services.billing` process and learn its port from --port-file."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT
from tests.waiting import wait_until_blocking


def start_billing(database: str, workdir: Path, name: str) -> tuple[subprocess.Popen[bytes], Path]:
    port_file = workdir / f"{name}.port"
    port_file.unlink(missing_ok=True)
    log = (workdir / f"{name}.log").open("ab")
    proc = subprocess.Popen(
        [sys.executable, "-m", "services.billing", "--port", "0", "--port-file", str(port_file),
         "--database", database, "--data-dir", str(workdir), "--log-level", "WARNING"],
        cwd=ROOT, stdout=log, stderr=log, start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    return proc, port_file


def operator_token(workdir: Path) -> str:
    """The operator token a billing process started in `workdir` made (in its data dir)."""
    return (workdir / "billing_operator_token").read_text().strip()


def wait_port(proc: subprocess.Popen[bytes], port_file: Path, timeout: float = 30) -> str:
    def written() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode} before serving")
        return port_file.exists()

    wait_until_blocking(written, timeout, f"the server to write its port file {port_file.name}")
    return f"127.0.0.1:{port_file.read_text().strip()}"
