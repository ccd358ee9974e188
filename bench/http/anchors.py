"""The HTTP benchmark's anchors as real processes: llama.cpp's OpenAI-compatible server
(`python -m llama_cpp.server`, llama-cpp-python[server] in the project's venv) on the GGUF the bundled model
is built from, and the LiteLLM proxy (its own bench-only venv, bench/http/.venv-litellm, so that its pins stay
out of the project's) in front of that server, from a config file only: no database, a master key,
LITELLM_LOCAL_MODEL_COST_MAP=True so that it reads its bundled price map instead of downloading one.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

from bench.http.client import Connection
from services.common.ports import free_port

ROOT = Path(__file__).resolve().parents[2]
LITELLM_VENV = ROOT / "bench" / "http" / ".venv-litellm"
LLAMA_ALIAS = "smollm2-gguf"
LITELLM_MODEL = "smollm2-via-litellm"
LITELLM_KEY = "sk-bench-http-litellm-master-key-0123456789"  # LiteLLM wants at least 32 characters
LLAMA_THREADS = 2


def _start(cmd: list[str], env: dict[str, str], processes: list[subprocess.Popen[bytes]], log: Path) -> None:
    with log.open("wb") as out:
        processes.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                          stdin=subprocess.DEVNULL, start_new_session=True))


def _tail(log: Path) -> str:
    return log.read_text(errors="replace")[-3000:]


async def wait_ready(conn: Connection, path: str, proc: subprocess.Popen[bytes], log: Path,
                     timeout_s: float = 300.0) -> None:
    deadline = time.monotonic() + timeout_s
    while await conn.get(path) != 200:
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{log.stem} did not become ready:\n{_tail(log)}")
        await asyncio.sleep(0.25)  # polling a process that is loading, under a deadline


async def start_llama_server(gguf: Path, tmp: Path, processes: list[subprocess.Popen[bytes]]) -> tuple[int, str]:
    """`python -m llama_cpp.server` on a free port, once it has answered a 1-token chat completion; returns
    (port, weight buffers: "default", or "plain" when the default ones died with a signal on this CPU and
    bench/http/llama_server.py runs the same server with plain CPU buffers instead)."""
    for module, buffers in (("llama_cpp.server", "default"), ("bench.http.llama_server", "plain")):
        port = free_port()
        log = tmp / f"llama-server-{buffers}.log"
        _start([sys.executable, "-m", module, "--model", str(gguf), "--model_alias", LLAMA_ALIAS,
                "--n_threads", str(LLAMA_THREADS), "--n_threads_batch", str(LLAMA_THREADS),
                "--interrupt_requests", "False", "--host", "127.0.0.1", "--port", str(port)],
               dict(os.environ), processes, log)
        proc = processes[-1]
        conn = Connection("127.0.0.1", port)
        await wait_ready(conn, "/v1/models", proc, log)
        try:
            status, _ = await conn.post("/v1/chat/completions", {
                "model": LLAMA_ALIAS, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1})
            if status == 200:
                return port, buffers
        except ConnectionError:
            pass
        finally:
            await conn.close()
        try:
            code = proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            code = None
        if code is None or code >= 0:
            raise RuntimeError(f"llama.cpp's server failed its first request (exit {code}):\n{_tail(log)}")
    raise RuntimeError(f"llama.cpp's server died with a signal with plain CPU buffers too:\n{_tail(log)}")


async def start_litellm(llama_port: int, tmp: Path, processes: list[subprocess.Popen[bytes]]) -> int:
    """The LiteLLM proxy (one worker) in front of llama.cpp's server; returns its port once it is live."""
    binary = LITELLM_VENV / "bin" / "litellm"
    if not binary.exists():
        raise RuntimeError(f"{binary} is missing: `make bench-http-deps` creates the LiteLLM venv")
    config = tmp / "litellm.yaml"
    config.write_text(yaml.safe_dump({
        "model_list": [{"model_name": LITELLM_MODEL, "litellm_params": {
            "model": f"openai/{LLAMA_ALIAS}", "api_base": f"http://127.0.0.1:{llama_port}/v1", "api_key": "none"}}],
        "general_settings": {"master_key": LITELLM_KEY}}))
    port = free_port()
    log = tmp / "litellm.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    env.update({"LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_LOG": "ERROR", "DISABLE_ADMIN_UI": "True"})
    _start([str(binary), "--config", str(config), "--host", "127.0.0.1", "--port", str(port), "--num_workers", "1"],
           env, processes, log)
    await wait_ready(Connection("127.0.0.1", port, LITELLM_KEY), "/health/liveliness", processes[-1], log)
    return port


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found: dict[str, str] = {}
    try:
        found["llama_cpp_python"] = version("llama_cpp_python")
    except PackageNotFoundError:
        found["llama_cpp_python"] = "missing"
    python = LITELLM_VENV / "bin" / "python"
    if python.exists():
        found["litellm"] = subprocess.run(
            [str(python), "-c", "import importlib.metadata as m; print(m.version('litellm'))"],
            capture_output=True, text=True, check=False).stdout.strip() or "unknown"
    return found
