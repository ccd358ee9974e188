"""Turns the `authorization` metadata into a Principal (API key or JWT), or refuses.

UNAUTHENTICATED: no credentials, unknown / revoked / expired key, invalid JWT (see auth/jwt.py).
The admin token guards AdminService; it is compared in constant time.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable
from datetime import UTC, datetime

from services.common.errors import Unauthenticated
from services.common.generation import TrafficClass
from services.router.auth.api_keys import ApiKeyRecord, looks_like_api_key
from services.router.auth.jwt import JwtClaims, JwtVerifier, looks_like_jwt
from services.router.auth.key_store import KeyStore
from services.router.types import Principal

_CLASS_NAMES = {"core": TrafficClass.CORE, "interactive": TrafficClass.INTERACTIVE, "batch": TrafficClass.BATCH}


def bearer_token(authorization: str) -> str:
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthenticated("missing credentials: send metadata 'authorization: Bearer <API key or JWT>'")
    return token.strip()


class Authenticator:
    def __init__(
        self,
        keys: KeyStore,
        admin_token: str,
        jwt: JwtVerifier | None = None,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._keys = keys
        self._admin_token = admin_token
        self._jwt = jwt
        self._clock = clock

    def authenticate(self, authorization: str) -> Principal:
        token = bearer_token(authorization)
        if looks_like_api_key(token):
            return self._key_principal(self._keys.find_by_secret(token))
        return self._token_principal(token)

    async def aauthenticate(self, authorization: str) -> Principal:
        """`authenticate`, looking up a key memory lacks on a worker thread (the event loop does not wait)."""
        token = bearer_token(authorization)
        if looks_like_api_key(token):
            return self._key_principal(await self._keys.afind_by_secret(token))
        return self._token_principal(token)

    def _key_principal(self, record: ApiKeyRecord | None) -> Principal:
        if record is None:
            raise Unauthenticated("unknown API key")
        if record.revoke_time is not None:
            raise Unauthenticated(f"API key {record.prefix}… was revoked; create a new one")
        if not record.is_valid_at(self._clock()):
            raise Unauthenticated(f"API key {record.prefix}… has expired; create a new one")
        return record.principal()

    def _token_principal(self, token: str) -> Principal:
        if looks_like_jwt(token):
            if self._jwt is None:
                raise Unauthenticated("JWT bearer tokens are not enabled on this router; use an API key")
            return _jwt_principal(self._jwt.claims_of(self._jwt.verify(token)))
        raise Unauthenticated("unknown API key")

    def authenticate_admin(self, authorization: str) -> None:
        token = bearer_token(authorization)
        if not hmac.compare_digest(token.encode(), self._admin_token.encode()):
            raise Unauthenticated("AdminService needs 'authorization: Bearer <admin token>' (see the data dir)")


def _jwt_principal(claims: JwtClaims) -> Principal:
    return Principal(
        tenant_id=claims.tenant,
        key_id=f"jwt:{claims.subject}",
        traffic_class=_CLASS_NAMES[claims.traffic_class],
        allowed_models=claims.models,
        requests_per_minute=claims.requests_per_minute,
        tokens_per_minute=claims.tokens_per_minute,
    )
