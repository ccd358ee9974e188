"""Start `autoglm up` as a real process on free ports for end-to-end tests."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from services.common.ports import free_port, free_ports
from tests.conftest import ROOT, tool

BANNER_LINE = "Open-AutoGLM mesh is up"


@dataclass
class Mesh:
    process: subprocess.Popen[bytes]
    config: Path
    router: str
    billing: str
    inference: list[str]
    output: list[str]
    data_dir: Path
    tls: bool = False
    ca_cert: str = ""
    # The OpenAI-compatible HTTP API, e.g. "https://127.0.0.1:PORT/v1".
    openai_base_url: str = ""

    def transport(self) -> list[str]:
        """grpcurl flags to reach the router's public port."""
        return ["-cacert", self.ca_cert] if self.tls else ["-plaintext"]

    def mesh_tls(self, service: str) -> list[str]:
        """grpcurl flags to reach another service's sidecar with `service`'s mesh identity."""
        if not self.tls:
            return ["-plaintext"]
        certs = self.data_dir / "certs"
        return ["-cacert", str(certs / "ca.pem"), "-cert", str(certs / f"{service}.pem"),
                "-key", str(certs / f"{service}.key")]

    def descendants(self) -> list[int]:
        """PIDs of every process the launcher started for this mesh (they carry AUTOGLM_MESH=<data dir>)."""
        marker = f"AUTOGLM_MESH={self.data_dir.resolve()}".encode()
        pids = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                environ = (entry / "environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if marker in environ:
                pids.append(int(entry.name))
        return pids


def write_config(tmp: Path, replicas: int = 1, extra: dict | None = None) -> tuple[Path, dict]:
    router, billing = free_port(), free_port()
    # Replicas listen on consecutive ports from the first one: a free run.
    base = free_ports(replicas, consecutive=True)[0]
    # Start from the documented defaults (deploy/local/mesh.yaml) and move everything to free ports / tmp.
    doc = yaml.safe_load((ROOT / "deploy/local/mesh.yaml").read_text())
    doc["mesh"].update({"data_dir": str(tmp / "data"), "shutdown_grace_s": 10})
    doc["router"].update({"port": router, "metrics_port": 0, "http_port": free_port()})
    doc["billing"].update({"port": billing, "metrics_port": 0})
    doc["inference"].update({"port": base, "replicas": replicas, "metrics_port": 0})
    for key, value in (extra or {}).items():
        doc.setdefault(key, {}).update(value)
    tmp.mkdir(parents=True, exist_ok=True)
    path = tmp / "mesh.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path, doc


def start_mesh(tmp: Path, processes: list, timeout_s: float = 600, replicas: int = 1,
               extra_args: tuple[str, ...] = (), extra_config: dict | None = None) -> Mesh:
    config, doc = write_config(tmp, replicas, extra_config)
    proc = subprocess.Popen(
        [tool("autoglm"), "up", "--config", str(config), *extra_args],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
    )
    processes.append(proc)
    output: list[str] = []
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout_s
    buffer = b""
    while BANNER_LINE not in "".join(output):
        remaining = deadline - time.monotonic()
        if remaining <= 0 or proc.poll() is not None:
            raise AssertionError("mesh did not come up:\n" + "".join(output)[-4000:])
        ready, _, _ = select.select([proc.stdout], [], [], min(remaining, 5))
        if ready:
            chunk = os.read(proc.stdout.fileno(), 65536)
            buffer += chunk
            *lines, buffer_tail = buffer.split(b"\n")
            buffer = buffer_tail
            output.extend(line.decode(errors="replace") + "\n" for line in lines)
    # Read the rest of the banner (it is printed in one write).
    ready, _, _ = select.select([proc.stdout], [], [], 2)
    if ready:
        output.append(os.read(proc.stdout.fileno(), 65536).decode(errors="replace"))
    base = doc["inference"]["port"]
    data_dir = Path(doc["mesh"]["data_dir"])
    endpoint = json.loads((data_dir / "endpoint.json").read_text())
    return Mesh(
        process=proc, config=config, router=f"127.0.0.1:{doc['router']['port']}",
        billing=f"127.0.0.1:{doc['billing']['port']}",
        inference=[f"127.0.0.1:{base + i}" for i in range(replicas)], output=output, data_dir=data_dir,
        tls=bool(endpoint["tls"]), ca_cert=endpoint["ca_cert"], openai_base_url=endpoint.get("openai_base_url", ""),
    )


def stop_mesh(mesh: Mesh, timeout_s: float = 60) -> int:
    mesh.process.send_signal(signal.SIGINT)
    return mesh.process.wait(timeout=timeout_s)
