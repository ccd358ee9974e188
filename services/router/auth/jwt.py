"""JWT bearer tokens: HS256 with a shared secret, RS256/ES256 with public keys from a JWKS file.

Checks the signature, `exp` / `nbf` (with a small leeway), and optionally `iss` / `aud`; the tenant is
read from a configured claim. Any failure is `Unauthenticated` with a message that says which check failed.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from services.common.errors import Unauthenticated


def b64url_decode(part: str) -> bytes:
    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))


def b64url_encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def looks_like_jwt(token: str) -> bool:
    return token.count(".") == 2 and token.startswith("eyJ")


def _b64_int(value: str) -> int:
    return int.from_bytes(b64url_decode(value), "big")


def load_jwks(path: Path) -> dict[str, Any]:
    """Public keys of a JWKS file by `kid` (RSA `n`/`e`, EC P-256 `x`/`y`)."""
    document = json.loads(path.read_text())
    keys: dict[str, Any] = {}
    for jwk in document.get("keys", []):
        kid = jwk.get("kid", "")
        if jwk.get("kty") == "RSA":
            keys[kid] = rsa.RSAPublicNumbers(_b64_int(jwk["e"]), _b64_int(jwk["n"])).public_key()
        elif jwk.get("kty") == "EC" and jwk.get("crv") == "P-256":
            keys[kid] = ec.EllipticCurvePublicNumbers(
                _b64_int(jwk["x"]), _b64_int(jwk["y"]), ec.SECP256R1()
            ).public_key()
    return keys


@dataclass(frozen=True)
class JwtSettings:
    hs256_secret: bytes = b""
    jwks_path: Path | None = None
    tenant_claim: str = "tenant"
    issuer: str = ""
    audience: str = ""
    leeway_s: float = 30.0

    @property
    def enabled(self) -> bool:
        return bool(self.hs256_secret) or self.jwks_path is not None


class JwtVerifier:
    def __init__(self, settings: JwtSettings, clock: Callable[[], float] = time.time) -> None:
        self._settings = settings
        self._clock = clock
        self._keys = load_jwks(settings.jwks_path) if settings.jwks_path else {}

    def verify(self, token: str) -> dict[str, Any]:
        """The claims of a valid token; `Unauthenticated` otherwise."""
        try:
            head_b64, body_b64, sig_b64 = token.split(".")
            header = json.loads(b64url_decode(head_b64))
            claims = json.loads(b64url_decode(body_b64))
            signature = b64url_decode(sig_b64)
        except (ValueError, json.JSONDecodeError) as exc:
            raise Unauthenticated("malformed JWT: expected three base64url parts with JSON header and claims") from exc
        if not isinstance(claims, dict) or not isinstance(header, dict):
            raise Unauthenticated("malformed JWT: header and claims must be JSON objects")
        self._check_signature(header, f"{head_b64}.{body_b64}".encode(), signature)
        self._check_claims(claims)
        return claims

    def tenant_of(self, claims: dict[str, Any]) -> str:
        tenant = claims.get(self._settings.tenant_claim)
        if not isinstance(tenant, str) or not tenant:
            raise Unauthenticated(f"JWT has no {self._settings.tenant_claim!r} claim naming the tenant")
        return tenant

    def _check_signature(self, header: dict[str, Any], signed: bytes, signature: bytes) -> None:
        alg = header.get("alg")
        if alg == "HS256":
            if not self._settings.hs256_secret:
                raise Unauthenticated("HS256 tokens are not accepted by this router")
            expected = hmac.new(self._settings.hs256_secret, signed, hashlib.sha256).digest()
            if not hmac.compare_digest(expected, signature):
                raise Unauthenticated("JWT signature is invalid")
            return
        if alg not in ("RS256", "ES256"):
            raise Unauthenticated(f"JWT algorithm {alg!r} is not accepted (use HS256, RS256 or ES256)")
        key = self._keys.get(header.get("kid", ""))
        if key is None and len(self._keys) == 1 and "kid" not in header:
            key = next(iter(self._keys.values()))
        if key is None:
            raise Unauthenticated("JWT key id (kid) is not in the configured JWKS")
        try:
            if alg == "RS256" and isinstance(key, rsa.RSAPublicKey):
                key.verify(signature, signed, padding.PKCS1v15(), hashes.SHA256())
            elif alg == "ES256" and isinstance(key, ec.EllipticCurvePublicKey) and len(signature) == 64:
                der = encode_dss_signature(int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big"))
                key.verify(der, signed, ec.ECDSA(hashes.SHA256()))
            else:
                raise Unauthenticated(f"JWT algorithm {alg} does not match the key type of kid")
        except InvalidSignature as exc:
            raise Unauthenticated("JWT signature is invalid") from exc

    def _check_claims(self, claims: dict[str, Any]) -> None:
        now = self._clock()
        leeway = self._settings.leeway_s
        exp = claims.get("exp")
        if exp is not None and (not isinstance(exp, int | float) or now > exp + leeway):
            raise Unauthenticated("JWT has expired")
        nbf = claims.get("nbf")
        if nbf is not None and (not isinstance(nbf, int | float) or now + leeway < nbf):
            raise Unauthenticated("JWT is not valid yet (nbf)")
        if self._settings.issuer and claims.get("iss") != self._settings.issuer:
            raise Unauthenticated("JWT issuer (iss) is not accepted")
        if self._settings.audience:
            aud = claims.get("aud")
            audiences = aud if isinstance(aud, list) else [aud]
            if self._settings.audience not in audiences:
                raise Unauthenticated("JWT audience (aud) does not include this router")
