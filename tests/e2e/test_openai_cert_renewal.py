"""The OpenAI-compatible HTTPS port follows the mesh's certificate renewal (`mesh.cert_lifetime_hours`)
without a restart, in both sidecar modes: the router's own HTTPS server (`--sidecar python`) re-reads its
renewed certificate, the router's Envoy (`--sidecar envoy`) reloads it through file SDS. A new TLS
handshake then presents the renewed certificate, and a stream opened before the renewal is read to its
end after it, on its original connection."""

from __future__ import annotations

import socket
import ssl
import subprocess
from pathlib import Path
from urllib.parse import urlparse

import pytest
from cryptography import x509

from tests.e2e.mesh_client import MODEL
from tests.e2e.mesh_process import Mesh, start_mesh, stop_mesh
from tests.e2e.test_openai_api import sdk
from tests.waiting import wait_until_blocking

pytestmark = pytest.mark.slow

# 36 s: renewed every 24 s (at 2/3 of the lifetime), so a renewal lands within a short wait.
LIFETIME_HOURS = 0.01


def served_serial(base_url: str, ca_cert: str) -> int:
    """The serial number of the certificate a fresh TLS handshake with the HTTPS port presents (verified
    against the mesh CA)."""
    url = urlparse(base_url)
    assert url.hostname and url.port
    context = ssl.create_default_context(cafile=ca_cert)
    with socket.create_connection((url.hostname, url.port), timeout=10) as raw, \
            context.wrap_socket(raw, server_hostname=url.hostname) as tls:
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return int(x509.load_der_x509_certificate(der).serial_number)


def file_serial(path: Path) -> int:
    return int(x509.load_pem_x509_certificate(path.read_bytes()).serial_number)


def router_process(mesh: Mesh) -> int:
    """The PID of the mesh's router (the `services.router` child of the launcher)."""
    return next(pid for pid in mesh.descendants()
                if b"services.router\0" in Path(f"/proc/{pid}/cmdline").read_bytes())


@pytest.mark.parametrize("sidecar", ["python", "envoy"])
def test_a_renewed_certificate_reaches_new_handshakes_and_an_open_stream_carries_on(
        tmp_path: Path, sidecar: str) -> None:
    processes: list[subprocess.Popen[bytes]] = []
    mesh = start_mesh(tmp_path, processes, extra_args=("--sidecar", sidecar),
                      extra_config={"mesh": {"cert_lifetime_hours": LIFETIME_HOURS}})
    try:
        client = sdk(mesh, (mesh.data_dir / "demo_api_key").read_text().strip())
        router_pid = router_process(mesh)
        before = served_serial(mesh.openai_base_url, mesh.ca_cert)
        with client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "Tell a long story about the sea."}],
                max_tokens=64, temperature=0, stream=True, extra_body={"cache_policy": "bypass"}) as stream:
            chunks = iter(stream)
            first = next(chunks)
            assert first.choices[0].delta.role == "assistant"
            after = wait_until_blocking(
                lambda: (s := served_serial(mesh.openai_base_url, mesh.ca_cert)) != before and s, 90,
                "a new handshake to present the renewed certificate", interval=0.5)
            rest = list(chunks)  # the connection opened before the renewal delivers the whole answer
        assert rest and rest[-1].choices[0].finish_reason in ("stop", "length")
        # The router kept running (the same process) and serves the certificate now on disk.
        assert wait_until_blocking(
            lambda: served_serial(mesh.openai_base_url, mesh.ca_cert) == file_serial(
                mesh.data_dir / "certs" / "router.pem") or None, 60,
            "the served certificate to be the one on disk", interval=0.5)
        assert after != before and router_process(mesh) == router_pid
        answer = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}],
                                                max_tokens=2)
        assert answer.choices[0].message.content is not None
    finally:
        if mesh.process.poll() is None:
            assert stop_mesh(mesh) == 0
