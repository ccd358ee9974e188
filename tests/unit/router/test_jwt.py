"""JWT bearer tokens: required `exp` with leeway, `iss`/`aud` when configured, JWKS rotation without a
restart, typed claims, and a precise UNAUTHENTICATED for every kind of bad token."""

from __future__ import annotations

import base64
import json
import os
import time
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from services.common.errors import Unauthenticated
from services.common.generation import TrafficClass
from services.router.auth.authenticator import Authenticator
from services.router.auth.jwt import JwtSettings, JwtVerifier
from services.router.auth.key_store import KeyStore
from services.router.config import RouterConfig

SECRET = b"a-shared-secret-of-at-least-sixty-four-bytes-so-hs512-does-not-warn!!"


def hs256(claims: dict[str, Any], secret: bytes = SECRET) -> str:
    return jwt.encode(claims, secret, algorithm="HS256")


def later(seconds: float = 300) -> int:
    return int(time.time() + seconds)


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def raw_token(header: dict[str, Any], claims: dict[str, Any]) -> str:
    """A token with any claims at all (PyJWT's encoder would convert some), signed with SECRET."""
    import hashlib
    import hmac

    signed = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(claims).encode())}"
    return f"{signed}.{b64(hmac.new(SECRET, signed.encode(), hashlib.sha256).digest())}"


def write_jwks(path: Path, keys: dict[str, Any]) -> None:
    jwks = []
    for kid, key in keys.items():
        algorithm = RSAAlgorithm if isinstance(key, rsa.RSAPrivateKey) else ECAlgorithm
        jwk = algorithm.to_jwk(key.public_key(), as_dict=True)
        jwks.append({**jwk, "kid": kid})
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"keys": jwks}))
    tmp.replace(path)


def signed(key: Any, kid: str, claims: dict[str, Any]) -> str:
    alg = "RS256" if isinstance(key, rsa.RSAPrivateKey) else "ES256"
    return jwt.encode(claims, key, algorithm=alg, headers={"kid": kid})


def test_valid_tokens_give_a_typed_principal(tmp_path: Path) -> None:
    auth = Authenticator(KeyStore(tmp_path / "k.db", b"p"), "admin",
                         JwtVerifier(JwtSettings(hs256_secret=SECRET, tenant_claim="org")))
    token = hs256({"org": "globex", "sub": "u1", "exp": later(), "rpm": 60, "tpm": 1000, "models": ["m"],
                   "traffic_class": "Batch"})
    principal = auth.authenticate(f"Bearer {token}")
    assert (principal.tenant_id, principal.key_id, principal.traffic_class) == ("globex", "jwt:u1", TrafficClass.BATCH)
    assert (principal.requests_per_minute, principal.tokens_per_minute, principal.allowed_models) == (60, 1000, ("m",))


def test_exp_is_required_and_checked_with_the_configured_leeway() -> None:
    strict = JwtVerifier(JwtSettings(hs256_secret=SECRET, leeway_s=5))
    lenient = JwtVerifier(JwtSettings(hs256_secret=SECRET, leeway_s=60))
    with pytest.raises(Unauthenticated, match="no 'exp' claim"):
        strict.verify(hs256({"tenant": "t"}))
    ten_seconds_ago = hs256({"tenant": "t", "exp": int(time.time() - 10)})
    assert lenient.verify(ten_seconds_ago)["tenant"] == "t"
    with pytest.raises(Unauthenticated, match="expired"):
        strict.verify(ten_seconds_ago)
    with pytest.raises(Unauthenticated, match="not valid yet"):
        strict.verify(hs256({"tenant": "t", "exp": later(), "nbf": later(120)}))


def test_issuer_and_audience_are_required_when_configured() -> None:
    verifier = JwtVerifier(JwtSettings(hs256_secret=SECRET, issuer="https://idp.example", audience="autoglm"))
    good = {"tenant": "t", "exp": later(), "iss": "https://idp.example", "aud": ["other", "autoglm"]}
    assert verifier.verify(hs256(good))["tenant"] == "t"
    for missing in ("iss", "aud"):
        with pytest.raises(Unauthenticated, match=f"no '{missing}' claim"):
            verifier.verify(hs256({k: v for k, v in good.items() if k != missing}))
    with pytest.raises(Unauthenticated, match=r"issuer \(iss\) is not accepted"):
        verifier.verify(hs256({**good, "iss": "https://evil.example"}))
    with pytest.raises(Unauthenticated, match=r"audience \(aud\) does not include"):
        verifier.verify(hs256({**good, "aud": "someone-else"}))
    # Not configured: neither is required.
    assert JwtVerifier(JwtSettings(hs256_secret=SECRET)).verify(hs256({"tenant": "t", "exp": later()}))


def test_jwks_file_is_reloaded_when_it_changes(tmp_path: Path) -> None:
    path = tmp_path / "jwks.json"
    old, new = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    write_jwks(path, {"k1": old})
    verifier = JwtVerifier(JwtSettings(jwks_path=path))
    claims = {"tenant": "t", "exp": later()}
    assert verifier.verify(signed(old, "k1", claims))
    write_jwks(path, {"k1": new})  # the same kid, a new key: rotated in place
    assert verifier.verify(signed(new, "k1", claims))
    with pytest.raises(Unauthenticated, match="signature is invalid"):
        verifier.verify(signed(old, "k1", claims))
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    write_jwks(path, {"k2": rsa_key})  # a new kid; k1 retired
    assert verifier.verify(signed(rsa_key, "k2", claims))
    with pytest.raises(Unauthenticated, match="kid"):
        verifier.verify(signed(new, "k1", claims))
    path.write_text('{"keys": [')  # a half-written file keeps the last good keys
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 1_000_000))
    assert verifier.verify(signed(rsa_key, "k2", claims))


def test_a_jwks_file_that_does_not_parse_at_start_is_a_config_error(tmp_path: Path) -> None:
    (tmp_path / "jwks.json").write_text("not json")
    with pytest.raises(ValueError, match=r"jwks\.json: not JSON"):
        JwtVerifier(JwtSettings(jwks_path=tmp_path / "jwks.json"))


@pytest.mark.parametrize(("claim", "value"), [
    ("rpm", "100"), ("rpm", 1.5), ("rpm", True), ("rpm", -1), ("tpm", [5]), ("tpm", {"n": 1}),
    ("models", "m"), ("models", [1]), ("traffic_class", "vip"), ("traffic_class", 3), ("sub", 42),
    ("tenant", 7), ("tenant", ""),
])
def test_a_claim_of_the_wrong_type_is_unauthenticated_naming_it(tmp_path: Path, claim: str, value: Any) -> None:
    auth = Authenticator(KeyStore(tmp_path / "k.db", b"p"), "admin", JwtVerifier(JwtSettings(hs256_secret=SECRET)))
    token = hs256({"tenant": "t", "exp": later(), claim: value})
    with pytest.raises(Unauthenticated, match=f"'{claim}'"):
        auth.authenticate(f"Bearer {token}")


def test_malformed_expired_and_foreign_tokens_each_get_a_precise_message(tmp_path: Path) -> None:
    ours, theirs = rsa.generate_private_key(public_exponent=65537, key_size=2048), \
        rsa.generate_private_key(public_exponent=65537, key_size=2048)
    write_jwks(tmp_path / "jwks.json", {"r1": ours})
    verifier = JwtVerifier(JwtSettings(hs256_secret=SECRET, jwks_path=tmp_path / "jwks.json"))
    claims = {"tenant": "t", "exp": later()}
    cases = {
        "eyJhbGciOi.not-base64!.x": "malformed JWT",
        "eyJub3QganNvbg.e30.x": "malformed JWT",
        raw_token({"alg": "HS256"}, {"tenant": "t", "exp": "tomorrow"}): "malformed JWT: .*exp",
        hs256({"tenant": "t", "exp": int(time.time() - 3600)}): "expired",
        signed(theirs, "r1", claims): "signature is invalid",
        hs256(claims, b"another-secret-of-at-least-32-bytes-that-is-not-the-one-this-router-knows"): "signature is invalid",
        signed(theirs, "unknown", claims): "kid",
        raw_token({"alg": "none"}, claims): "algorithm 'none' is not accepted",
        jwt.encode(claims, SECRET, algorithm="HS512"): "algorithm 'HS512' is not accepted",
    }
    for token, message in cases.items():
        with pytest.raises(Unauthenticated, match=message):
            verifier.verify(token)


def test_rs256_token_to_a_router_without_jwks_and_any_jwt_when_disabled(tmp_path: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    token = signed(key, "e1", {"tenant": "t", "exp": later()})
    with pytest.raises(Unauthenticated, match="has no JWKS"):
        JwtVerifier(JwtSettings(hs256_secret=SECRET)).verify(token)
    with pytest.raises(Unauthenticated, match="JWT bearer tokens are not enabled"):
        Authenticator(KeyStore(tmp_path / "k.db", b"p"), "admin").authenticate(f"Bearer {token}")


def test_short_hs256_secret_and_wild_leeway_are_config_errors() -> None:
    with pytest.raises(ValueError, match="at least 32 bytes"):
        RouterConfig(jwt_hs256_secret="s3cret")
    with pytest.raises(ValueError, match="jwt_leeway_s"):
        RouterConfig(jwt_leeway_s=-1)
