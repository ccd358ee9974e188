"""API keys are stored only as keyed hashes, and credentials map to UNAUTHENTICATED / principals."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import sqlite3
import stat
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from services.common.errors import InvalidInput, Unauthenticated
from services.router.auth.api_keys import NewApiKey, load_or_create_secret_file
from services.router.auth.authenticator import Authenticator
from services.router.auth.jwt import JwtSettings, JwtVerifier, b64url_encode
from services.router.auth.key_store import KeyStore
from services.router.types import TrafficClass


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


def _jwt(header: dict, claims: dict, sign) -> str:
    signed = f"{b64url_encode(json.dumps(header).encode())}.{b64url_encode(json.dumps(claims).encode())}"
    return f"{signed}.{b64url_encode(sign(signed.encode()))}"


def test_hs256_jwt_gives_tenant_and_rejects_tampering_and_expiry(tmp_path: Path) -> None:
    verifier = JwtVerifier(JwtSettings(hs256_secret=b"s3cret", tenant_claim="org"))
    auth = Authenticator(make_store(tmp_path, [datetime.now(UTC)]), "admin", verifier)

    def sign(data: bytes) -> bytes:
        return hmac.new(b"s3cret", data, hashlib.sha256).digest()

    good = _jwt({"alg": "HS256", "typ": "JWT"}, {"org": "globex", "sub": "u1", "exp": time.time() + 60}, sign)
    principal = auth.authenticate(f"Bearer {good}")
    assert principal.tenant_id == "globex" and principal.key_id == "jwt:u1"
    head, _body, sig = good.split(".")
    forged_body = b64url_encode(json.dumps({"org": "other", "exp": time.time() + 60}).encode())
    with pytest.raises(Unauthenticated, match="signature"):
        auth.authenticate(f"Bearer {head}.{forged_body}.{sig}")
    expired = _jwt({"alg": "HS256"}, {"org": "globex", "exp": time.time() - 3600}, sign)
    with pytest.raises(Unauthenticated, match="expired"):
        auth.authenticate(f"Bearer {expired}")
    no_tenant = _jwt({"alg": "HS256"}, {"sub": "x"}, sign)
    with pytest.raises(Unauthenticated, match="org"):
        auth.authenticate(f"Bearer {no_tenant}")
    with pytest.raises(Unauthenticated, match="algorithm"):
        auth.authenticate(f"Bearer {_jwt({'alg': 'none'}, {'org': 'g'}, lambda d: b'')}")


def _jwk_int(value: int) -> str:
    return b64url_encode(value.to_bytes((value.bit_length() + 7) // 8, "big"))


def test_rs256_and_es256_from_jwks(tmp_path: Path) -> None:
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ec_key = ec.generate_private_key(ec.SECP256R1())
    rn, ecn = rsa_key.public_key().public_numbers(), ec_key.public_key().public_numbers()
    (tmp_path / "jwks.json").write_text(json.dumps({"keys": [
        {"kty": "RSA", "kid": "r1", "n": _jwk_int(rn.n), "e": _jwk_int(rn.e)},
        {"kty": "EC", "kid": "e1", "crv": "P-256", "x": _jwk_int(ecn.x), "y": _jwk_int(ecn.y)},
    ]}))
    verifier = JwtVerifier(JwtSettings(jwks_path=tmp_path / "jwks.json"))

    def es_sign(data: bytes) -> bytes:
        r, s = decode_dss_signature(ec_key.sign(data, ec.ECDSA(hashes.SHA256())))
        return r.to_bytes(32, "big") + s.to_bytes(32, "big")

    rs = _jwt({"alg": "RS256", "kid": "r1"}, {"tenant": "t1"},
              lambda d: rsa_key.sign(d, padding.PKCS1v15(), hashes.SHA256()))
    es = _jwt({"alg": "ES256", "kid": "e1"}, {"tenant": "t2"}, es_sign)
    assert verifier.tenant_of(verifier.verify(rs)) == "t1"
    assert verifier.tenant_of(verifier.verify(es)) == "t2"
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    forged = _jwt({"alg": "RS256", "kid": "r1"}, {"tenant": "t1"},
                  lambda d: other.sign(d, padding.PKCS1v15(), hashes.SHA256()))
    with pytest.raises(Unauthenticated, match="signature"):
        verifier.verify(forged)
    with pytest.raises(Unauthenticated, match="kid"):
        verifier.verify(_jwt({"alg": "RS256", "kid": "nope"}, {"tenant": "t"}, lambda d: b"x"))
    assert serialization  # keep import used for readers exporting keys
