"""Certificates: SPIFFE URI SAN, lifetime, and reload of rotated files."""

from __future__ import annotations

import datetime as dt
import os
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


def test_private_keys_are_0600_from_creation_even_with_umask_0(tmp_path: Path, monkeypatch) -> None:
    """The key's bytes only ever go into a file that is already 0600: no window at 0644 (or 0666)."""
    pair = certs.issue(certs.make_ca(), "router")
    modes_at_write: list[int] = []
    real_write = os.write

    def spy(fd: int, data: bytes | memoryview) -> int:
        if bytes(data[:40]) == pair.key_pem[:40]:
            modes_at_write.append(os.fstat(fd).st_mode & 0o777)
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", spy)
    old = os.umask(0)
    try:
        certs.write_pair(tmp_path, "router", pair)
    finally:
        os.umask(old)
    assert modes_at_write == [0o600]
    assert (tmp_path / "router.key").stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "router.pem").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "router.key").read_bytes() == pair.key_pem
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp file left


def test_renewal_is_due_once_a_third_of_the_lifetime_is_left(tmp_path: Path) -> None:
    certs.init_ca(tmp_path)
    life = dt.timedelta(days=7)
    issued = dt.datetime.now(dt.UTC)
    pem = certs.issue_to(tmp_path, "billing", ttl=life).read_bytes()
    assert not certs.renewal_due(pem, life, issued + dt.timedelta(days=4, hours=15))
    assert certs.renewal_due(pem, life, issued + dt.timedelta(days=4, hours=17))
    assert certs.renew_due(tmp_path, ["billing"], life) == []
    later = issued + dt.timedelta(days=5)
    assert certs.renew_due(tmp_path, ["billing", "router"], life, now=later) == ["billing", "router"]
    assert (tmp_path / "billing.pem").read_bytes() != pem
    assert abs(certs.next_renewal(tmp_path, ["billing"], life) - (issued + life * 2 / 3)) < dt.timedelta(minutes=1)


def test_a_key_and_certificate_that_do_not_match_are_not_loaded(tmp_path: Path) -> None:
    """Read between the two renames of a renewal (new key, old certificate): the old pair stays."""
    certs.init_ca(tmp_path)
    certs.issue_to(tmp_path, "router")
    files = certs.CertFiles(tmp_path, "router")
    first = files.pair
    fresh = certs.issue(certs.read_pair(tmp_path, "ca"), "router")
    (tmp_path / "router.key").write_bytes(fresh.key_pem)
    assert not files.refresh()
    assert files.pair == first
    (tmp_path / "router.pem").write_bytes(fresh.cert_pem)
    assert files.refresh() and files.pair == fresh
