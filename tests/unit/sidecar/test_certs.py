"""Certificates: SPIFFE URI SAN, lifetime, and reload of rotated files."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from sidecar import certs


def test_issued_certificate_carries_the_spiffe_id_and_expires_as_asked(tmp_path: Path) -> None:
    certs.init_ca(tmp_path)
    path = certs.issue_to(tmp_path, "billing", trust_domain="example.org", namespace="prod", ttl=dt.timedelta(hours=2))
    pem = path.read_bytes()
    assert certs.uri_sans(pem) == ("spiffe://example.org/ns/prod/sa/billing",)
    left = certs.not_valid_after(pem) - dt.datetime.now(dt.UTC)
    assert dt.timedelta(hours=1, minutes=55) < left <= dt.timedelta(hours=2)
    assert (tmp_path / "billing.key").stat().st_mode & 0o777 == 0o600


def test_cert_files_pick_up_a_rotation(tmp_path: Path) -> None:
    certs.init_ca(tmp_path)
    certs.issue_to(tmp_path, "router")
    files = certs.CertFiles(tmp_path, "router")
    first = files.pair.cert_pem
    assert not files.refresh()
    certs.issue_to(tmp_path, "router")
    assert files.refresh()
    assert files.pair.cert_pem != first and files.version == 2
    assert files.identity == "spiffe://autoglm.local/ns/default/sa/router"
