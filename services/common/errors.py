"""The domain exception hierarchy of the mesh.

Domain modules raise these and never import grpc; one table (`services.common.error_table`) turns them
into gRPC status codes and HTTP statuses with OpenAI error bodies. Messages are written for the caller:
they say what was wrong and what to do, and never carry internals (the full exception goes to the log
only).
"""

from __future__ import annotations

from collections.abc import Mapping


class DomainError(Exception):
    """Base of every error a caller may see. `reason` is a stable UPPER_SNAKE code."""

    reason: str = "ERROR"

    def __init__(
        self,
        message: str,
        *,
        reason: str | None = None,
        field: str = "",
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if reason is not None:
            self.reason = reason
        self.field = field
        self.metadata: dict[str, str] = dict(metadata or {})


class InvalidInput(DomainError):
    """The request is malformed or out of range; retrying it unchanged cannot succeed."""

    reason = "INVALID_INPUT"


class NotFound(DomainError):
    reason = "NOT_FOUND"


class AlreadyExists(DomainError):
    reason = "ALREADY_EXISTS"


class FailedPrecondition(DomainError):
    """The system is not in a state that allows the operation (e.g. a price already in force)."""

    reason = "FAILED_PRECONDITION"


class Unauthenticated(DomainError):
    """No credentials, or credentials that are unknown, revoked or expired."""

    reason = "UNAUTHENTICATED"


class PermissionDenied(DomainError):
    """Valid credentials that may not do this (model not allowed, blocked by policy)."""

    reason = "PERMISSION_DENIED"


class QuotaExceeded(DomainError):
    """A quota is used up. `retry_after_s` > 0 when waiting helps (rate limits)."""

    reason = "QUOTA_EXCEEDED"

    def __init__(self, message: str, *, retry_after_s: float = 0.0, **kwargs: object) -> None:
        super().__init__(message, **kwargs)  # type: ignore[arg-type]
        self.retry_after_s = retry_after_s


class RateLimited(QuotaExceeded):
    reason = "RATE_LIMITED"


class BudgetExceeded(QuotaExceeded):
    """Spend would pass a hard budget. Mapped to RESOURCE_EXHAUSTED, never retried automatically."""

    reason = "BUDGET_EXCEEDED"


class QueueFull(QuotaExceeded):
    """A bounded admission queue is full; the caller may retry later or elsewhere."""

    reason = "QUEUE_FULL"


class Unavailable(DomainError):
    """A dependency or replica cannot serve now; safe to retry."""

    reason = "UNAVAILABLE"


class PeerUnreachable(Unavailable):
    """A call to a peer service failed in transport (refused or reset connection, no answer in time): the
    peer may not even have seen it. The only peer failure that counts as "the peer is down"."""


class NotReady(Unavailable):
    reason = "NOT_READY"


class DeadlineExceeded(DomainError):
    reason = "DEADLINE_EXCEEDED"


class Cancelled(DomainError):
    reason = "CANCELLED"


class Internal(DomainError):
    """Something inside the mesh failed that the caller did not cause (a peer's unexpected answer, a mesh
    policy refusing one service's call to another). The message stays generic; the detail is logged."""

    reason = "INTERNAL"


class NotImplementedYet(DomainError):
    """An RPC of the contract that this build does not provide yet. The message names what is missing."""

    reason = "NOT_IMPLEMENTED"
