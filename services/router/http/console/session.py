"""Console sign-in: the admin token (may change) or the operator-read token (may only look) buys a signed
session cookie that expires; every change also needs the session's CSRF token in `x-csrf-token`.

The cookie is `<payload>.<mac>`: payload = base64url JSON {role, exp, csrf}, mac = HMAC-SHA256 over it with a
key derived from the console's secret and the token the role signed in with, so replacing the admin (or
read) token ends that role's sessions. No grpc or HTTP imports: the routes apply it."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

from services.common.errors import PermissionDenied, Unauthenticated

COOKIE = "autoglm_console"
CSRF_HEADER = "x-csrf-token"


class Role(StrEnum):
    ADMIN = "admin"  # every page and every change
    READ = "read"  # every page, no change


@dataclass(frozen=True)
class Session:
    role: Role
    expires: int
    csrf: str

    @property
    def may_change(self) -> bool:
        return self.role is Role.ADMIN


class Sessions:
    def __init__(self, secret: bytes, admin_token: str, read_token: str = "", lifetime_s: int = 8 * 3600,
                 clock: Callable[[], float] = time.time) -> None:
        if len(secret) < 32:
            raise ValueError("the console's session secret must be at least 32 bytes")
        self._secret = secret
        self._tokens = {Role.ADMIN: admin_token, Role.READ: read_token}
        self.lifetime_s = lifetime_s
        self._clock = clock

    def _key(self, role: Role) -> bytes:
        return hmac.new(self._secret, f"{role}:{self._tokens[role]}".encode(), hashlib.sha256).digest()

    def sign_in(self, token: str) -> tuple[Session, str]:
        """The session a token opens and its cookie value; Unauthenticated for any other token."""
        given = token.strip().encode()
        role = next((r for r, t in self._tokens.items() if t and hmac.compare_digest(given, t.encode())), None)
        if role is None:
            raise Unauthenticated("that is neither the admin token nor the operator-read token")
        session = Session(role, int(self._clock()) + self.lifetime_s, secrets.token_urlsafe(24))
        payload = base64.urlsafe_b64encode(json.dumps(
            {"role": str(role), "exp": session.expires, "csrf": session.csrf}).encode()).decode().rstrip("=")
        mac = base64.urlsafe_b64encode(hmac.new(self._key(role), payload.encode(), hashlib.sha256).digest())
        return session, f"{payload}.{mac.decode().rstrip('=')}"

    def session(self, cookie: str) -> Session:
        """The session a cookie carries; Unauthenticated when it is missing, forged, stale or expired."""
        payload, _, mac = cookie.partition(".")
        try:
            doc = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
            role = Role(doc["role"])
            expires, csrf = int(doc["exp"]), str(doc["csrf"])
        except (ValueError, KeyError, TypeError):
            raise Unauthenticated("sign in to the console first") from None
        want = base64.urlsafe_b64encode(hmac.new(self._key(role), payload.encode(), hashlib.sha256).digest())
        if not self._tokens[role] or not hmac.compare_digest(want.decode().rstrip("=").encode(), mac.encode()):
            raise Unauthenticated("sign in to the console first")
        if expires <= self._clock():
            raise Unauthenticated("the console session expired; sign in again")
        return Session(role, expires, csrf)

    @staticmethod
    def check_change(session: Session, csrf_header: str) -> None:
        """A change needs the admin role and the session's CSRF token sent back in the header."""
        if not session.may_change:
            raise PermissionDenied("the operator-read token may view the console but not change anything; sign in "
                                   "with the admin token")
        if not csrf_header or not hmac.compare_digest(csrf_header.encode(), session.csrf.encode()):
            raise PermissionDenied(f"missing or wrong {CSRF_HEADER}: reload the page and try again")
