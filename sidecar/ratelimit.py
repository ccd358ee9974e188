"""Local token-bucket rate limits (per route, per sidecar): one bucket per caller, in a bounded table.

A caller is whoever a call's credentials name, known without verifying them (that is the service's job):
the SHA-256 of its bearer token, else the mesh identity of its client certificate, else its network
address (the port left out: every new connection would be a new caller). So a flood from one caller
empties only that caller's bucket. The table keeps at most `max_callers` buckets; the least recently
used is dropped first (a dropped caller starts again with a full bucket).
"""

from __future__ import annotations

import hashlib
import re
import time
from collections import OrderedDict
from collections.abc import Callable

# RFC 6750 `b64token`: what an API key, a JWT or an admin token look like; anything else is not a credential.
_BEARER = re.compile(r"[A-Za-z0-9\-._~+/]+=*")
MAX_TOKEN_CHARS = 4096  # a JWT with many claims fits; longer is refused


class TokenBucket:
    def __init__(self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate
        self.burst = float(burst)
        self._clock = clock
        self._tokens = float(burst)
        self._at = clock()

    def try_take(self) -> bool:
        now = self._clock()
        self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
        self._at = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False


class CallerBuckets:
    """One TokenBucket per caller key, at most `max_callers` of them (least recently used dropped)."""

    def __init__(self, rate: float, burst: int, max_callers: int, clock: Callable[[], float] = time.monotonic
                 ) -> None:
        self.rate, self.burst, self.max_callers = rate, burst, max_callers
        self._clock = clock
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()

    def __len__(self) -> int:
        return len(self._buckets)

    def try_take(self, caller: str) -> bool:
        bucket = self._buckets.get(caller)
        if bucket is None:
            bucket = self._buckets[caller] = TokenBucket(self.rate, self.burst, self._clock)
            if len(self._buckets) > self.max_callers:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(caller)
        return bucket.try_take()


def bearer_token(authorization: str) -> str | None:
    """The token of a well-formed `Bearer <token>` header value, else None (missing or garbled)."""
    scheme, _, token = authorization.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token or len(token) > MAX_TOKEN_CHARS or not _BEARER.fullmatch(token):
        return None
    return token


def address_of(peer: str) -> str:
    """A grpc peer string without its port: `ipv4:10.0.0.7:5123` → `ipv4:10.0.0.7`, `ipv6:[::1]:80` → `ipv6:[::1]`."""
    kind, _, rest = peer.partition(":")
    if kind in ("ipv4", "ipv6"):
        return f"{kind}:{rest.rpartition(':')[0] or rest}"
    return peer


def caller_key(token: str | None, identity: str, peer: str) -> str:
    if token is not None:
        return "bearer:" + hashlib.sha256(token.encode()).hexdigest()[:32]
    if identity:
        return "id:" + identity
    return "addr:" + address_of(peer)
