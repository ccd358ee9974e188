"""`autoglm up` (what `make run` runs) as a user meets it: the mesh comes up, the banner's grpcurl
commands work against the router, every service reports SERVING, and Ctrl-C leaves no process behind."""

from __future__ import annotations

import json
import os
import select
import shlex
import signal
import subprocess
from pathlib import Path

from tests.conftest import tool
from tests.e2e.mesh_process import start_mesh, stop_mesh
from tests.waiting import wait_until_blocking


def grpcurl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([tool("grpcurl"), *args], capture_output=True, text=True, timeout=30)


def test_mesh_comes_up_answers_grpcurl_and_stops_cleanly(tmp_path, processes) -> None:
    mesh = start_mesh(tmp_path, processes)
    assert mesh.tls, "make run puts sidecars with mTLS in front of every service by default"
    banner = "".join(mesh.output)
    assert mesh.router in banner and "grpcurl" in banner

    listed = grpcurl(*mesh.transport(), mesh.router, "list")
    assert listed.returncode == 0, listed.stderr
    services = set(listed.stdout.split())
    assert {
        "autoglm.router.v1.RouterService",
        "autoglm.router.v1.AdminService",
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
    } <= services

    described = grpcurl(*mesh.transport(), mesh.router, "describe", "autoglm.router.v1.RouterService")
    assert described.returncode == 0, described.stderr
    # Proto comments reach users through reflection.
    assert "Streams the answer as text deltas" in described.stdout

    for address, flags in [(mesh.router, mesh.transport()), (mesh.billing, mesh.mesh_tls("router")),
                           *[(a, mesh.mesh_tls("router")) for a in mesh.inference]]:
        health = grpcurl(*flags, "-d", '{"service": ""}', address, "grpc.health.v1.Health/Check")
        assert health.returncode == 0, health.stderr
        assert '"status": "SERVING"' in health.stdout, address

    # The banner's ready-to-paste grpcurl command streams a real answer from the bundled model.
    lines = banner.splitlines()
    end = next(i for i, line in enumerate(lines) if "RouterService/Generate" in line)
    start = max(i for i in range(end) if lines[i].split() and lines[i].split()[0].endswith("grpcurl"))
    command = shlex.split(" ".join(line.strip().rstrip("\\") for line in lines[start:end + 1]))
    streamed = subprocess.run([tool("grpcurl"), *command[1:]], capture_output=True, text=True, timeout=300)
    assert streamed.returncode == 0, streamed.stderr
    decoder, text, messages, rest = json.JSONDecoder(), "", [], streamed.stdout.strip()
    while rest:
        message, index = decoder.raw_decode(rest)
        messages.append(message)
        rest = rest[index:].strip()
    text = "".join(m.get("delta", "") for m in messages)
    assert len(messages) >= 3 and len(text.split()) >= 3, streamed.stdout
    summary = messages[-1]["summary"]
    assert summary["usage"]["completionTokens"] >= 3
    assert summary["finishReason"] in {"FINISH_REASON_STOP", "FINISH_REASON_LENGTH"}

    # A child that dies is restarted (with backoff) and the restart is logged; the service comes back.
    billing_pid = next(pid for pid in mesh.descendants()
                       if b"services.billing" in Path(f"/proc/{pid}/cmdline").read_bytes())
    os.kill(billing_pid, signal.SIGKILL)
    def billing_restarted() -> bool:
        restarted = [pid for pid in mesh.descendants()
                     if b"services.billing" in Path(f"/proc/{pid}/cmdline").read_bytes() and pid != billing_pid]
        if not restarted:
            return False
        health = grpcurl(*mesh.mesh_tls("router"), "-d", '{"service": ""}', mesh.billing, "grpc.health.v1.Health/Check")
        return '"status": "SERVING"' in health.stdout

    wait_until_blocking(billing_restarted, 60, "billing to be restarted and serving", interval=0.25)
    assert "child_exited_restarting" in "".join(mesh.output) + read_available(mesh)

    children = mesh.descendants()
    assert len(children) >= 3, children
    assert stop_mesh(mesh) == 0
    assert mesh.descendants() == []


def read_available(mesh) -> str:  # type: ignore[no-untyped-def]
    """Whatever the launcher printed since the banner (non-blocking)."""
    chunks = []
    while select.select([mesh.process.stdout], [], [], 0.5)[0]:
        chunk = os.read(mesh.process.stdout.fileno(), 65536)
        if not chunk:
            break
        chunks.append(chunk.decode(errors="replace"))
    return "".join(chunks)


def grpcurl_generate(mesh) -> subprocess.CompletedProcess[str]:  # type: ignore[no-untyped-def]
    """grpcurl Generate through the mesh's router with the demo key the launcher wrote."""
    key = (mesh.data_dir / "demo_api_key").read_text().strip()
    return subprocess.run(
        [tool("grpcurl"), *mesh.transport(), "-H", f"authorization: Bearer {key}", "-d",
         '{"model": "smollm2-135m-instruct", "prompt": "Say hi.", "sampling": {"max_tokens": 4}}',
         mesh.router, "autoglm.router.v1.RouterService/Generate"], capture_output=True, text=True, timeout=120)


def test_a_second_start_on_the_same_data_dir_serves_again(tmp_path, processes) -> None:
    """`make run` twice: ports of internal listeners change between starts, the registry follows; the
    first start's demo key is revoked when the second makes a new one."""
    first = start_mesh(tmp_path, processes)
    first_key = (first.data_dir / "demo_api_key").read_text().strip()
    assert stop_mesh(first) == 0
    second = start_mesh(tmp_path, processes)  # fresh free ports, the same data dir
    streamed = grpcurl_generate(second)
    assert streamed.returncode == 0, streamed.stderr
    assert '"finishReason"' in streamed.stdout
    second_key = (second.data_dir / "demo_api_key").read_text().strip()
    assert second_key != first_key
    (second.data_dir / "demo_api_key").write_text(first_key + "\n")
    refused = grpcurl_generate(second)
    assert refused.returncode != 0 and "revoked" in refused.stderr
    assert stop_mesh(second) == 0


def test_the_mesh_runs_unchanged_with_envoy_as_every_sidecar(tmp_path, processes) -> None:
    """`autoglm up --sidecar envoy`: the same policy rendered for the real Envoy; a client sees the same API."""
    mesh = start_mesh(tmp_path, processes, extra_args=("--sidecar", "envoy"))
    assert mesh.tls
    assert any(b"envoy" in Path(f"/proc/{pid}/cmdline").read_bytes() for pid in mesh.descendants())
    streamed = grpcurl_generate(mesh)
    assert streamed.returncode == 0, streamed.stderr
    assert '"completionTokens": 4' in streamed.stdout or '"finishReason": "FINISH_REASON_STOP"' in streamed.stdout
    assert stop_mesh(mesh) == 0
    assert mesh.descendants() == []


def test_a_killed_launcher_leaves_no_orphans(tmp_path, processes) -> None:
    """Even SIGKILL of `autoglm up` itself takes every child down with it (parent-death signal)."""
    mesh = start_mesh(tmp_path, processes)
    assert len(mesh.descendants()) >= 7
    os.kill(mesh.process.pid, signal.SIGKILL)
    mesh.process.wait(timeout=10)
    wait_until_blocking(lambda: not mesh.descendants(), 30, "every child of the killed launcher to exit",
                        interval=0.25)


def test_operator_manages_keys_and_reads_the_audit_log_with_the_cli(tmp_path, processes) -> None:
    """`autoglm keys` and `autoglm audit` against the mesh `make run` starts (TLS edge, its own CA)."""
    mesh = start_mesh(tmp_path, processes)

    def autoglm(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([tool("autoglm"), *argv[:1], "--data-dir", str(mesh.data_dir), *argv[1:]],
                              capture_output=True, text=True, timeout=60)

    created = autoglm("keys", "create", "--tenant", "acme", "--name", "ci", "--tpm", "5000")
    assert created.returncode == 0, created.stderr
    reply = json.loads(created.stdout)
    secret, key_id, prefix = reply["secret"], reply["api_key"]["key_id"], reply["api_key"]["prefix"]

    def complete(key: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [tool("grpcurl"), *mesh.transport(), "-H", f"authorization: Bearer {key}", "-d",
             '{"model": "smollm2-135m-instruct", "prompt": "Say hi.", "sampling": {"max_tokens": 2}}',
             mesh.router, "autoglm.router.v1.RouterService/Complete"], capture_output=True, text=True, timeout=120)

    assert complete(secret).returncode == 0
    listed = autoglm("keys", "list", "--tenant", "acme")
    assert listed.returncode == 0, listed.stderr
    assert [k["key_id"] for k in json.loads(listed.stdout)["api_keys"]] == [key_id]
    assert secret not in listed.stdout

    revoked = autoglm("keys", "revoke", key_id)
    assert revoked.returncode == 0, revoked.stderr
    refused = complete(secret)
    assert refused.returncode != 0 and "Unauthenticated" in refused.stderr and "revoked" in refused.stderr

    audit = autoglm("audit", "--format", "json")
    assert audit.returncode == 0, audit.stderr
    events = json.loads(audit.stdout)
    actions = [e["action"] for e in events]
    assert actions[:2] == ["key.revoke", "key.create"]  # newest first
    assert "model.register" in actions  # the bundled model, registered at start
    assert events[1]["details"]["prefix"] == prefix and events[1]["target"] == f"key/{key_id}"
    assert events[1]["details"]["tokens_per_minute"] == 5000 and "5000.0" not in audit.stdout
    assert secret not in audit.stdout
    only = autoglm("audit", "--action", "key.revoke")
    assert only.returncode == 0 and only.stdout.count("key.revoke") == 1 and "key.create" not in only.stdout

    assert stop_mesh(mesh) == 0
