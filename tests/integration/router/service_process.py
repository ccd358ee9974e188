"""Start a service as a real process (`python -m services.<name> --port 0 ...`) and learn its address from
the "<name> listening on HOST:PORT" line it prints once serving. Used by tests that kill replicas and by
the router benchmark (separate processes, so nothing shares one event loop)."""

from __future__ import annotations

import os
import re
import select
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
LISTENING = re.compile(r"(\w+) listening on ([\d.]+:\d+)")


def start_service(name: str, args: list[str], processes: list[subprocess.Popen[bytes]],
                  timeout_s: float = 120.0) -> tuple[subprocess.Popen[bytes], str]:
    env = {**os.environ, "AUTOGLM_LOG_LEVEL": os.environ.get("AUTOGLM_LOG_LEVEL", "WARNING"),
           "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "gen")])}
    proc = subprocess.Popen(
        [sys.executable, "-m", f"services.{name}", "--host", "127.0.0.1", "--port", "0", *args],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
    )
    processes.append(proc)
    assert proc.stdout is not None
    seen = b""
    deadline = time.monotonic() + timeout_s
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0 or proc.poll() is not None:
            raise AssertionError(f"{name} did not start:\n" + seen.decode(errors="replace")[-3000:])
        ready, _, _ = select.select([proc.stdout], [], [], min(remaining, 1.0))
        if ready:
            seen += os.read(proc.stdout.fileno(), 65536)
            match = LISTENING.search(seen.decode(errors="replace"))
            if match and match.group(1) == name:
                return proc, match.group(2)


def drain(proc: subprocess.Popen[bytes]) -> None:
    """Keep reading a process's output in the background so a full pipe never blocks it."""
    import threading

    def pump() -> None:
        assert proc.stdout is not None
        while os.read(proc.stdout.fileno(), 65536):
            pass

    threading.Thread(target=pump, daemon=True).start()


def stop(processes: list[subprocess.Popen[bytes]]) -> None:
    for proc in reversed(processes):
        if proc.poll() is None:
            proc.terminate()
    for proc in processes:
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
