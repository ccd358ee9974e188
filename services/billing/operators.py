"""Who may manage billing: budgets, prices, reports, alerts and the audit log need an operator.

An operator is either
- a caller presenting `authorization: Bearer <operator token>` (compared in constant time). The token is
  billing's `operator_token` setting, else the content of `operator_token_file` (a mounted secret that
  every billing replica shares), else `<data_dir>/billing_operator_token`, made (mode 0600) on first
  start; `autoglm budget|price|billing|usage` read it from there. Its audit actor is `operator-token`.
- a mesh identity named in `operator_identities`, as forwarded by billing's sidecar in the
  `x-forwarded-client-cert` header (Envoy's format, `By=...;URI=spiffe://...`, the sidecar's own element
  last). Only trusted with `trust_forwarded_identity`, which is safe only where nothing but the sidecar can
  reach billing's port and the sidecar replaces any copy of that header a caller sent. Its audit actor is
  the identity.

The usage path the router and inference use (RecordUsage, StreamUsage, Reserve, Settle, Release,
AcquireLeases, ReturnLease, CheckBudget) and the read-only price table (ListPrices, which the router quotes from) stay open to every
caller the mesh policy lets through. The audit log's actor is the operator's identity; a name the caller
gives in a request's `actor` field is kept beside it (`claimed_actor`), never in its place.
"""

from __future__ import annotations

import hmac
import os
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from services.common.errors import PermissionDenied, Unauthenticated

TOKEN_FILE = "billing_operator_token"
FORWARDED_IDENTITY = "x-forwarded-client-cert"
TOKEN_ACTOR = "operator-token"


@dataclass(frozen=True)
class Operator:
    """The identity an operator call is made with: what the audit log records as its actor."""

    actor: str


def load_or_create_token(path: Path) -> str:
    """The operator token in `path`, made (mode 0600 from the start) with random content when missing."""
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    token = secrets.token_urlsafe(32)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another process made it first
        return path.read_text().strip()
    with os.fdopen(fd, "w") as handle:
        handle.write(token + "\n")
    return token


def forwarded_uri(header: str) -> str:
    """The `URI=` of the last element of an `x-forwarded-client-cert` value ('' when it has none)."""
    last = header.rsplit(",", 1)[-1]
    for pair in last.split(";"):
        key, _, value = pair.strip().partition("=")
        if key.strip().lower() == "uri":
            return value.strip().strip('"')
    return ""


class OperatorAuth:
    def __init__(self, token: str, identities: frozenset[str] = frozenset(), trust_forwarded: bool = False) -> None:
        if not token:
            raise ValueError("billing needs an operator token")
        self._token = token.encode()
        self._identities = identities
        self._trust_forwarded = trust_forwarded

    def operator(self, metadata: Mapping[str, str]) -> Operator:
        """The operator making a call with this metadata; Unauthenticated / PermissionDenied otherwise."""
        authorization = metadata.get("authorization", "")
        if authorization:
            scheme, _, token = authorization.strip().partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self._token):
                raise Unauthenticated("the billing operator token is not valid: send 'authorization: Bearer "
                                      f"<token>' with the token from {TOKEN_FILE} in billing's data dir")
            return Operator(TOKEN_ACTOR)
        forwarded = metadata.get(FORWARDED_IDENTITY, "") if self._trust_forwarded else ""
        if forwarded:
            identity = forwarded_uri(forwarded)
            if identity and identity in self._identities:
                return Operator(identity)
            raise PermissionDenied("this caller's mesh identity is not a billing operator; budgets, prices, "
                                   "reports and the audit log need an operator")
        raise Unauthenticated("budgets, prices, reports and the audit log need a billing operator: send "
                              f"'authorization: Bearer <token>' with the token from {TOKEN_FILE} in billing's "
                              "data dir")
