"""API keys are stored only as keyed hashes, and credentials map to UNAUTHENTICATED / principals."""

from __future__ import annotations

import hashlib
import hmac
import os
import sqlite3
import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from services.common.errors import InvalidInput, Unauthenticated
from services.common.generation import TrafficClass
from services.router.auth.api_keys import NewApiKey, load_or_create_secret_file
from services.router.auth.authenticator import Authenticator
from services.router.auth.key_store import KeyStore


def make_store(tmp_path: Path, now: list[datetime]) -> KeyStore:
    return KeyStore(tmp_path / "keys.db", b"pepper", clock=lambda: now[0])


def test_secret_is_never_stored_and_prefix_identifies_it(tmp_path: Path) -> None:
    store = make_store(tmp_path, [datetime.now(UTC)])
    record, secret = store.create(NewApiKey(tenant_id="acme", name="ci", allowed_models=("m",),
                                            tokens_per_minute=100, traffic_class=TrafficClass.BATCH))
    assert secret.startswith(record.prefix) and len(record.prefix) == 11
    dump = "\n".join(sqlite3.connect(tmp_path / "keys.db").iterdump())
    assert secret not in dump
    assert hmac.new(b"pepper", secret.encode(), hashlib.sha256).hexdigest() in dump
    found = store.find_by_secret(secret)
    assert found is not None and found.key_id == record.key_id
    assert found.principal().traffic_class == TrafficClass.BATCH and found.allowed_models == ("m",)
    assert store.find_by_secret(secret + "x") is None


def test_pepper_file_is_private_and_stable(tmp_path: Path) -> None:
    first = load_or_create_secret_file(tmp_path / "pepper")
    assert stat.S_IMODE(os.stat(tmp_path / "pepper").st_mode) == 0o600
    assert load_or_create_secret_file(tmp_path / "pepper") == first


def test_revoked_expired_and_unknown_keys_are_unauthenticated(tmp_path: Path) -> None:
    now = [datetime.now(UTC)]
    store = make_store(tmp_path, now)
    auth = Authenticator(store, "admin", clock=lambda: now[0])
    revoked, revoked_secret = store.create(NewApiKey(tenant_id="acme"))
    _, expiring_secret = store.create(NewApiKey(tenant_id="acme", expire_time=now[0] + timedelta(minutes=1)))
    store.revoke(revoked.key_id)
    with pytest.raises(Unauthenticated, match="revoked"):
        auth.authenticate(f"Bearer {revoked_secret}")
    assert auth.authenticate(f"Bearer {expiring_secret}").tenant_id == "acme"
    now[0] += timedelta(minutes=2)
    with pytest.raises(Unauthenticated, match="expired"):
        auth.authenticate(f"Bearer {expiring_secret}")
    with pytest.raises(Unauthenticated, match="missing credentials"):
        auth.authenticate("")
    with pytest.raises(Unauthenticated, match="unknown"):
        auth.authenticate("Bearer ag_abcdefgh_zzz")
    assert [k.key_id for k in store.list("acme")] != [] and revoked.key_id not in [k.key_id for k in store.list()]
    assert revoked.key_id in [k.key_id for k in store.list(include_revoked=True)]
    with pytest.raises(Unauthenticated):
        auth.authenticate_admin("Bearer wrong")
    auth.authenticate_admin("Bearer admin")


def test_bad_tenant_is_invalid(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput):
        make_store(tmp_path, [datetime.now(UTC)]).create(NewApiKey(tenant_id="has space"))
