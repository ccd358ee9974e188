"""Refused TLS handshakes are logged: the real `python -m sidecar` process, bad client certificates
(none, another CA, expired) → one `tls_handshake_failed` JSON event each, with OpenSSL's reason, and the
Prometheus counter; the allowed identity produces none."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import urllib.request
from pathlib import Path

import grpc
import pytest

from autoglm.inference.v1 import inference_service_pb2 as pb
from autoglm.inference.v1 import inference_service_pb2_grpc as pb_grpc
from sidecar.handshake_log import parse_failure
from tests.conftest import ROOT
from tests.integration.sidecar.conftest import client_credentials, mtls_channel, write_policy
from tests.integration.sidecar.upstreams import FakeInference, start_fake_inference
from tests.waiting import wait_until


def test_grpc_handshake_lines_parse_to_the_openssl_reason() -> None:
    line = ("I1122 03:06:43.902433   12300 ssl_transport_security.cc:2563] Handshake failed with error "
            "SSL_ERROR_SSL: error:100000c0:SSL routines:OPENSSL_internal:PEER_DID_NOT_RETURN_A_CERTIFICATE: "
            "Invalid certificate verification context")
    assert parse_failure(line) == {"error": "SSL_ERROR_SSL", "reason": "PEER_DID_NOT_RETURN_A_CERTIFICATE"}
    assert parse_failure("I1122 03:06:43.9 1 chttp2_transport.cc:1] something else") is None


def scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as reply:
        return str(reply.read().decode())


def read_events(log: Path) -> list[dict[str, object]]:
    events = []
    for line in log.read_text().splitlines():
        if line.startswith("{"):
            events.append(json.loads(line))
    return events


async def test_refused_handshakes_are_logged_and_counted(pki: Path, tmp_path: Path, serve,
                                                         processes: list[subprocess.Popen[bytes]]) -> None:
    upstream = await serve(start_fake_inference(FakeInference()))
    log = tmp_path / "sidecar.log"
    with log.open("wb") as out, (tmp_path / "ports.json").open("wb") as ports_out:
        proc = subprocess.Popen(  # noqa: ASYNC220
            [sys.executable, "-m", "sidecar", "--policy", str(write_policy(tmp_path / "policy.yaml")),
             "--service", "inference", "--certs", str(pki), "--upstream", upstream.address,
             "--outbound-port", "-1"], cwd=ROOT, stdout=ports_out, stderr=out, start_new_session=True)
    processes.append(proc)
    def ports_written() -> bool:
        assert proc.poll() is None, log.read_text()
        return bool((tmp_path / "ports.json").read_text().strip())

    await wait_until(ports_written, 30, "the sidecar to write its ports")
    ports = json.loads((tmp_path / "ports.json").read_text())
    address = f"127.0.0.1:{ports['inbound']}"

    for cert in (None, "rogue", "expired"):
        async with mtls_channel(address, client_credentials(pki, cert, pki / "bad" if cert else None),
                                "inference") as chan:
            with pytest.raises(grpc.aio.AioRpcError):
                await pb_grpc.InferenceServiceStub(chan).CountTokens(pb.CountTokensRequest(prompt="a"), timeout=3)
    async with mtls_channel(address, client_credentials(pki, "router"), "inference") as chan:
        await pb_grpc.InferenceServiceStub(chan).CountTokens(pb.CountTokensRequest(prompt="a"), timeout=3)

    def refused() -> list[dict[str, object]]:
        return [e for e in read_events(log) if e["event"] == "tls_handshake_failed"]

    # The lines come through the log pipe asynchronously.
    await wait_until(lambda: len({e["reason"] for e in refused()}) >= 2, 10,
                     "two kinds of tls_handshake_failed in the sidecar's log")
    events = refused()
    reasons = {str(e["reason"]) for e in events}
    assert "PEER_DID_NOT_RETURN_A_CERTIFICATE" in reasons  # no client certificate
    assert "CERTIFICATE_VERIFY_FAILED" in reasons  # another CA, or expired
    assert len(events) >= 3 and all(e["sidecar"] == "inference" for e in events)
    metrics = await asyncio.to_thread(scrape, f"http://127.0.0.1:{ports['metrics']}/metrics")
    counted = sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
                  if line.startswith("sidecar_tls_handshake_failures_total{"))
    assert counted == len(events)
    assert not any(line.startswith("I") and "] " in line for line in log.read_text().splitlines()), \
        "grpc INFO chatter the operator did not ask for"
