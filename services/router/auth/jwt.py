"""JWT bearer tokens, verified by PyJWT: HS256 with a shared secret, RS256/ES256 with public keys from a
JWKS file.

Every token must carry `exp` (checked with `leeway_s` of clock skew allowed, as are `nbf` and `iat`);
`iss` and `aud` must be present and match whenever the router names an issuer / audience (recommended:
without them, any token signed by a trusted key for another purpose is accepted here). The JWKS file is
re-read when it changes (a key rotation needs no restart; a file that does not parse keeps the previous
keys and is logged). The claims the router uses have checked types: the tenant claim a non-empty
string, `sub` a string, `models` a list of strings, `traffic_class` one of core / interactive / batch,
`rpm` / `tpm` non-negative integers. Any failure is `Unauthenticated` with a message that says which
check (or which claim) failed.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
import structlog
from jwt import PyJWK
from jwt import exceptions as errors
from jwt.types import Options

from services.common.errors import Unauthenticated

log = structlog.get_logger(__name__)

# Algorithms a JWKS key of each type verifies (header `alg` must be one of its key's).
_KEY_ALGORITHMS = {"RSA": ("RS256",), "EC": ("ES256",)}
TRAFFIC_CLASSES = ("core", "interactive", "batch")


def looks_like_jwt(token: str) -> bool:
    return token.count(".") == 2 and token.startswith("eyJ")


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


@dataclass(frozen=True)
class JwtClaims:
    """The claims of a verified token that the router uses, with their types checked."""

    tenant: str
    subject: str
    models: tuple[str, ...] = ()
    traffic_class: str = "interactive"
    requests_per_minute: int = 0
    tokens_per_minute: int = 0


class JwksFile:
    """Public keys of a JWKS file by `kid`, re-read when the file changes (size, mtime, inode)."""

    def __init__(self, path: Path, monotonic: Callable[[], float] = time.monotonic) -> None:
        self.path = path
        self._monotonic = monotonic
        self._stamp: tuple[int, int, int, int] | None = None
        self._keys: dict[str, PyJWK] = {}
        self._forced_at = float("-inf")
        self._load(os.stat(path), strict=True)

    def keys(self) -> dict[str, PyJWK]:
        try:
            info = os.stat(self.path)
        except OSError as exc:
            log.warning("jwks_unreadable", path=str(self.path), error=str(exc))
            return self._keys  # the last good keys until the file is back
        if _stamp(info) != self._stamp:
            self._load(info)
        return self._keys

    def reload_for_unknown_kid(self) -> dict[str, PyJWK]:
        """Re-read now (at most once a second): a new key can land without changing size or mtime."""
        now = self._monotonic()
        if now - self._forced_at >= 1.0:
            self._forced_at = now
            try:
                self._load(os.stat(self.path))
            except OSError as exc:
                log.warning("jwks_unreadable", path=str(self.path), error=str(exc))
        return self._keys

    def _load(self, info: os.stat_result, strict: bool = False) -> None:
        try:
            keys = parse_jwks(self.path.read_text())
        except (OSError, ValueError) as exc:
            if strict:
                raise ValueError(f"JWKS file {self.path}: {exc}") from exc
            log.warning("jwks_not_reloaded", path=str(self.path), error=str(exc))
            return  # keep the previous keys; a later change is tried again
        if self._stamp is not None and keys.keys() != self._keys.keys():
            log.info("jwks_reloaded", path=str(self.path), kids=sorted(keys))
        self._stamp, self._keys = _stamp(info), keys


def _stamp(info: os.stat_result) -> tuple[int, int, int, int]:
    return info.st_size, info.st_mtime_ns, info.st_ctime_ns, info.st_ino


def parse_jwks(text: str) -> dict[str, PyJWK]:
    """RSA and EC P-256 public keys of a JWKS document by `kid` (other key types are skipped)."""
    try:
        document = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not JSON ({exc})") from exc
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise ValueError("expected a JSON object with a 'keys' list")
    keys: dict[str, PyJWK] = {}
    for jwk in document["keys"]:
        if not isinstance(jwk, dict) or jwk.get("kty") not in _KEY_ALGORITHMS:
            continue
        if jwk.get("kty") == "EC" and jwk.get("crv") != "P-256":
            continue
        try:
            keys[str(jwk.get("kid", ""))] = PyJWK(jwk, _KEY_ALGORITHMS[jwk["kty"]][0])
        except errors.PyJWTError as exc:
            raise ValueError(f"key {jwk.get('kid', '')!r}: {exc}") from exc
    return keys


class JwtVerifier:
    def __init__(self, settings: JwtSettings) -> None:
        self._settings = settings
        self._jwks = JwksFile(settings.jwks_path) if settings.jwks_path else None
        required = ["exp"] + (["iss"] if settings.issuer else []) + (["aud"] if settings.audience else [])
        self._required = required
        self._options: Options = {"require": required, "verify_aud": bool(settings.audience)}

    def verify(self, token: str) -> dict[str, Any]:
        """The claims of a valid token; `Unauthenticated` otherwise."""
        try:
            header = jwt.get_unverified_header(token)
        except errors.DecodeError as exc:
            raise Unauthenticated("malformed JWT: expected three base64url parts with a JSON header and "
                                  "claims") from exc
        key, algorithm = self._key_for(header)
        settings = self._settings
        try:
            claims: dict[str, Any] = jwt.decode(
                token, key, algorithms=[algorithm], options=self._options, leeway=settings.leeway_s,
                issuer=settings.issuer or None, audience=settings.audience or None)
        except errors.ExpiredSignatureError as exc:
            raise Unauthenticated("JWT has expired (exp is past, beyond the allowed clock skew); get a new "
                                  "token") from exc
        except errors.ImmatureSignatureError as exc:
            raise Unauthenticated("JWT is not valid yet (nbf or iat is in the future)") from exc
        except errors.MissingRequiredClaimError as exc:
            raise Unauthenticated(f"JWT has no {exc.claim!r} claim; this router requires "
                                  f"{', '.join(self._required)}") from exc
        except errors.InvalidIssuerError as exc:
            raise Unauthenticated("JWT issuer (iss) is not accepted by this router") from exc
        except errors.InvalidAudienceError as exc:
            raise Unauthenticated("JWT audience (aud) does not include this router") from exc
        except errors.InvalidSubjectError as exc:
            raise Unauthenticated("JWT claim 'sub' must be a string") from exc
        except errors.InvalidJTIError as exc:
            raise Unauthenticated("JWT claim 'jti' must be a string") from exc
        except errors.InvalidIssuedAtError as exc:
            raise Unauthenticated("JWT claim 'iat' must be a number (seconds since the epoch)") from exc
        except errors.InvalidSignatureError as exc:
            raise Unauthenticated("JWT signature is invalid (not signed by a key this router trusts)") from exc
        except errors.DecodeError as exc:  # bad base64 / JSON / numeric date types
            raise Unauthenticated(f"malformed JWT: {_reason(exc)}") from exc
        except errors.PyJWTError as exc:
            raise Unauthenticated(f"JWT refused: {_reason(exc)}") from exc
        return claims

    def claims_of(self, claims: dict[str, Any]) -> JwtClaims:
        """The typed claims the router uses; `Unauthenticated` naming the claim of a wrong type."""
        tenant_claim = self._settings.tenant_claim
        tenant = claims.get(tenant_claim)
        if not isinstance(tenant, str) or not tenant:
            raise Unauthenticated(f"JWT has no {tenant_claim!r} claim naming the tenant (a non-empty string)")
        subject = claims.get("sub", "jwt")
        if not isinstance(subject, str):
            raise Unauthenticated("JWT claim 'sub' must be a string")
        models = claims.get("models") or []
        if not isinstance(models, list) or not all(isinstance(m, str) for m in models):
            raise Unauthenticated("JWT claim 'models' must be a list of model names (strings)")
        traffic = claims.get("traffic_class", "interactive")
        if not isinstance(traffic, str) or traffic.lower() not in TRAFFIC_CLASSES:
            raise Unauthenticated(f"JWT claim 'traffic_class' must be one of {', '.join(TRAFFIC_CLASSES)}")
        return JwtClaims(tenant=tenant, subject=subject or "jwt", models=tuple(models),
                         traffic_class=traffic.lower(), requests_per_minute=_count(claims, "rpm"),
                         tokens_per_minute=_count(claims, "tpm"))

    def _key_for(self, header: dict[str, Any]) -> tuple[Any, str]:
        alg = header.get("alg")
        if alg == "HS256":
            if not self._settings.hs256_secret:
                raise Unauthenticated("HS256 tokens are not accepted by this router")
            return self._settings.hs256_secret, "HS256"
        if alg not in ("RS256", "ES256"):
            raise Unauthenticated(f"JWT algorithm {str(alg)[:20]!r} is not accepted (use HS256, RS256 or ES256)")
        if self._jwks is None:
            raise Unauthenticated(f"{alg} tokens are not accepted by this router (it has no JWKS)")
        kid = header.get("kid")
        keys = self._jwks.keys()
        jwk: PyJWK | None
        if kid is None and len(keys) == 1:
            jwk = next(iter(keys.values()))
        else:
            jwk = keys.get(str(kid)) or self._jwks.reload_for_unknown_kid().get(str(kid))
        if jwk is None:
            raise Unauthenticated("JWT key id (kid) is not in the configured JWKS")
        if alg not in _KEY_ALGORITHMS.get(str(jwk.key_type), ()):
            raise Unauthenticated(f"JWT algorithm {alg} does not match the type of its key (kid)")
        return jwk.key, alg


def _count(claims: dict[str, Any], name: str) -> int:
    value = claims.get(name, 0)
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise Unauthenticated(f"JWT claim {name!r} must be a non-negative integer")
    return value


def _reason(exc: Exception) -> str:
    return str(exc)[:200] or type(exc).__name__
