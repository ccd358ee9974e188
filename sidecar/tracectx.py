"""Trace context at the proxy: keep W3C `traceparent`/`tracestate` and `x-request-id` when the caller
sent them, make them when it did not, and pass B3 and everything else through untouched, except an
`x-forwarded-client-cert` the caller sent: never forwarded (the inbound proxy sets its own, naming the
verified peer)."""

from __future__ import annotations

import os
import random
from collections.abc import Sequence

TRACEPARENT = "traceparent"
TRACESTATE = "tracestate"
REQUEST_ID = "x-request-id"
AUTHORIZATION = "authorization"
# Envoy's header for the verified client identity (`By=<this sidecar>;URI=<peer SPIFFE id>`).
FORWARDED_CLIENT_CERT = "x-forwarded-client-cert"

# Never copied from the downstream call to the upstream one: HTTP/2 pseudo and hop-by-hop headers and
# those grpc sets itself (the deadline travels as the upstream call's own timeout).
HOP_BY_HOP = frozenset({
    "te", "connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade", "host",
    "content-type", "user-agent", "grpc-timeout", "grpc-encoding", "grpc-accept-encoding",
    "grpc-message-type", "content-length",
    FORWARDED_CLIENT_CERT,  # only the proxy's own, from the verified peer certificate, may reach the service
})


# Trace and request ids need to be unique, not secret: a PRNG seeded from the OS makes them without a
# getrandom() syscall per id (a proxied call without trace context needs three).
_ids = random.Random(os.urandom(32))


def new_trace_id() -> str:
    return f"{_ids.getrandbits(128) or 1:032x}"


def new_span_id() -> str:
    return f"{_ids.getrandbits(64) or 1:016x}"


def parse_traceparent(value: str) -> tuple[str, str, str] | None:
    """(trace_id, parent_span_id, flags) of a valid version-00 traceparent, else None."""
    parts = value.strip().split("-")
    if len(parts) < 4 or len(parts[0]) != 2 or len(parts[1]) != 32 or len(parts[2]) != 16 or len(parts[3]) != 2:
        return None
    try:
        int(parts[1], 16), int(parts[2], 16), int(parts[3], 16)
    except ValueError:
        return None
    if parts[1] == "0" * 32 or parts[2] == "0" * 16:
        return None
    return parts[1], parts[2], parts[3]


class Incoming:
    """What the proxy needs from one call's metadata, found in a single pass."""

    __slots__ = ("authorization", "forward", "request_id", "traceparent", "tracestate")

    def __init__(self, metadata: Sequence[tuple[str, str | bytes]] | None) -> None:
        self.forward: list[tuple[str, str | bytes]] = []
        self.traceparent = ""
        self.tracestate = ""
        self.request_id = ""
        self.authorization = ""  # forwarded too; read for the caller's rate-limit bucket and the bearer check
        for key, value in metadata or ():
            if key[0] == ":" or key in HOP_BY_HOP:
                continue
            if key == TRACEPARENT:
                self.traceparent = value if isinstance(value, str) else ""
            elif key == TRACESTATE:
                self.tracestate = value if isinstance(value, str) else ""
            elif key == REQUEST_ID:
                self.request_id = value if isinstance(value, str) else ""
            elif key == AUTHORIZATION:
                self.authorization = value if isinstance(value, str) else ""
                self.forward.append((key, value))
            else:
                self.forward.append((key, value))
