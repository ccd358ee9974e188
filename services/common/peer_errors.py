"""Failed calls to peer services (billing, inference) → domain errors: the one reviewed table.

Who wrote a status decides what it may say. A peer service's own error mapping puts an
`autoglm.common.v1.ErrorDetail` in `grpc-status-details-bin`, and its message is written for callers,
so that message (with its field and metadata) may pass on. A status without one comes from the gRPC
library, a sidecar or Envoy — a mesh-policy denial, a route limit, "no route" — and its text names
SPIFFE ids, internal methods and addresses: the caller gets the table's own message and the log gets
the rest. A budget refusal is recognised by billing's ErrorDetail reason BUDGET_EXCEEDED, never by the
bare code: a sidecar's PERMISSION_DENIED or RESOURCE_EXHAUSTED is not a budget decision.

| peer      | status                     | only when                     | domain error      | message   |
|-----------|----------------------------|-------------------------------|-------------------|-----------|
| billing   | UNAVAILABLE                |                               | PeerUnreachable   | ours      |
| billing   | DEADLINE_EXCEEDED          |                               | PeerUnreachable   | ours      |
| billing   | RESOURCE_EXHAUSTED         | reason BUDGET_EXCEEDED        | BudgetExceeded    | billing's |
| billing   | RESOURCE_EXHAUSTED         | any other (route rate limit)  | Unavailable       | ours      |
| billing   | INVALID_ARGUMENT           | billing wrote it              | InvalidInput      | billing's |
| billing   | NOT_FOUND                  | billing wrote it              | NotFound          | billing's |
| billing   | FAILED_PRECONDITION        | billing wrote it              | FailedPrecondition| billing's |
| inference | UNAVAILABLE                |                               | PeerUnreachable   | ours      |
| inference | RESOURCE_EXHAUSTED         |                               | QueueFull         | replica's when it wrote it |
| inference | DEADLINE_EXCEEDED          |                               | DeadlineExceeded  | ours      |
| inference | CANCELLED                  |                               | Cancelled         | ours      |
| inference | INVALID_ARGUMENT, OUT_OF_RANGE | the replica wrote it      | InvalidInput      | replica's |
| inference | NOT_FOUND                  | the replica wrote it          | NotFound          | replica's |
| inference | FAILED_PRECONDITION        | the replica wrote it          | FailedPrecondition| replica's |
| either    | anything else (PERMISSION_DENIED, UNAUTHENTICATED, INTERNAL, UNKNOWN, DATA_LOSS, UNIMPLEMENTED, …) | | Internal | generic |

Only transport failures (`PeerUnreachable`) count as a peer being down: the router retries them on
another replica (inference) or serves within its grace window (billing, see `router/metering.py`).
`QueueFull` is retried elsewhere too; everything else refuses the request, `Internal` ones with a
generic message while the log line `peer_call_failed` keeps the peer's code, text and reason.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import grpc
import structlog
from google.protobuf.message import DecodeError
from google.rpc import error_details_pb2, status_pb2

from autoglm.common.v1 import error_details_pb2 as autoglm_error_details_pb2
from services.common import errors

log = structlog.get_logger(__name__)

STATUS_DETAILS_KEY = "grpc-status-details-bin"
BUDGET_EXCEEDED = "BUDGET_EXCEEDED"


class Peer(Enum):
    BILLING = "billing"
    INFERENCE = "inference"


@dataclass(frozen=True)
class Row:
    error: type[errors.DomainError]
    message: str  # what the caller reads unless the peer's own text may pass
    peer_text: bool = False  # the row needs the peer's ErrorDetail, and then its message, field and metadata pass
    reason: str = ""  # the row needs the peer's ErrorDetail with this reason


INTERNAL = {
    Peer.BILLING: Row(errors.Internal, "the router could not complete this request with billing (an internal "
                                       "error, not caused by the request); the details are logged under this "
                                       "call's trace id"),
    Peer.INFERENCE: Row(errors.Internal, "an inference replica failed this request (an internal error, not caused "
                                         "by the request); the details are logged under this call's trace id"),
}

Code = grpc.StatusCode
TABLE: dict[Peer, dict[grpc.StatusCode, tuple[Row, ...]]] = {
    Peer.BILLING: {
        Code.UNAVAILABLE: (Row(errors.PeerUnreachable, "billing cannot be reached"),),
        Code.DEADLINE_EXCEEDED: (Row(errors.PeerUnreachable, "billing did not answer in time"),),
        Code.RESOURCE_EXHAUSTED: (
            Row(errors.BudgetExceeded, "the budget does not cover this request", peer_text=True,
                reason=BUDGET_EXCEEDED),
            Row(errors.Unavailable, "billing is shedding load; retry shortly"),
        ),
        Code.INVALID_ARGUMENT: (Row(errors.InvalidInput, "", peer_text=True),),
        Code.NOT_FOUND: (Row(errors.NotFound, "", peer_text=True),),
        Code.FAILED_PRECONDITION: (Row(errors.FailedPrecondition, "", peer_text=True),),
    },
    Peer.INFERENCE: {
        Code.UNAVAILABLE: (Row(errors.PeerUnreachable, "an inference replica could not be reached; retry shortly"),),
        Code.RESOURCE_EXHAUSTED: (
            Row(errors.QueueFull, "", peer_text=True),
            Row(errors.QueueFull, "the inference replicas are full; retry shortly"),
        ),
        Code.DEADLINE_EXCEEDED: (Row(errors.DeadlineExceeded, "the generation did not finish before its deadline"),),
        Code.CANCELLED: (Row(errors.Cancelled, "the generation was cancelled"),),
        Code.INVALID_ARGUMENT: (Row(errors.InvalidInput, "", peer_text=True),),
        Code.OUT_OF_RANGE: (Row(errors.InvalidInput, "", peer_text=True),),
        Code.NOT_FOUND: (Row(errors.NotFound, "", peer_text=True),),
        Code.FAILED_PRECONDITION: (Row(errors.FailedPrecondition, "", peer_text=True),),
    },
}


@dataclass(frozen=True)
class PeerStatus:
    """What a peer's failed call said: its code and text, and the ErrorDetail / RetryInfo its service wrote."""

    code: grpc.StatusCode
    text: str
    detail: autoglm_error_details_pb2.ErrorDetail | None = None
    retry_after_s: float = 0.0

    @classmethod
    def of(cls, exc: grpc.aio.AioRpcError) -> PeerStatus:
        detail, retry_after = None, 0.0
        for key, value in exc.trailing_metadata() or ():
            if key != STATUS_DETAILS_KEY or not isinstance(value, bytes):
                continue
            try:
                status = status_pb2.Status.FromString(value)
            except DecodeError:
                break
            for item in status.details:
                if item.Is(autoglm_error_details_pb2.ErrorDetail.DESCRIPTOR):
                    detail = autoglm_error_details_pb2.ErrorDetail()
                    item.Unpack(detail)
                elif item.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
                    info = error_details_pb2.RetryInfo()
                    item.Unpack(info)
                    retry_after = info.retry_delay.ToTimedelta().total_seconds()
        return cls(exc.code(), exc.details() or "", detail, retry_after)


def row_for(peer: Peer, status: PeerStatus) -> Row:
    """The table's row for `status`: the first of its code's rows whose conditions hold, else INTERNAL."""
    for row in TABLE[peer].get(status.code, ()):
        if (row.peer_text or row.reason) and status.detail is None:
            continue
        if row.reason and status.detail is not None and status.detail.reason != row.reason:
            continue
        return row
    return INTERNAL[peer]


def domain_error(peer: Peer, status: PeerStatus, address: str = "") -> errors.DomainError:
    row = row_for(peer, status)
    detail = status.detail
    event = log.error if row.error is errors.Internal else log.info
    event("peer_call_failed", peer=peer.value, address=address, code=status.code.name, details=status.text,
          reason=detail.reason if detail is not None else None, mapped=row.error.__name__)
    kwargs: dict[str, object] = {}
    if issubclass(row.error, errors.QuotaExceeded) and status.retry_after_s > 0:
        kwargs["retry_after_s"] = status.retry_after_s
    if row.peer_text and detail is not None:
        return row.error(status.text or row.message or status.code.name, reason=detail.reason or None,
                         field=detail.field, metadata=dict(detail.metadata), **kwargs)  # type: ignore[arg-type]
    return row.error(row.message, **kwargs)  # type: ignore[arg-type]


def billing_error(exc: grpc.aio.AioRpcError) -> errors.DomainError:
    """A failed billing call as the domain error the table gives it."""
    return domain_error(Peer.BILLING, PeerStatus.of(exc))


def inference_error(exc: grpc.aio.AioRpcError, address: str) -> errors.DomainError:
    """A failed call to the inference replica at `address` as the domain error the table gives it."""
    return domain_error(Peer.INFERENCE, PeerStatus.of(exc), address)
