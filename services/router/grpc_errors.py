"""Peer call failures → domain errors, so the request path never sees grpc types."""

from __future__ import annotations

import grpc

from services.common import errors

_INFERENCE: dict[grpc.StatusCode, type[errors.DomainError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: errors.InvalidInput,
    grpc.StatusCode.OUT_OF_RANGE: errors.InvalidInput,
    grpc.StatusCode.RESOURCE_EXHAUSTED: errors.QueueFull,
    grpc.StatusCode.DEADLINE_EXCEEDED: errors.DeadlineExceeded,
    grpc.StatusCode.CANCELLED: errors.Cancelled,
    grpc.StatusCode.NOT_FOUND: errors.NotFound,
    grpc.StatusCode.FAILED_PRECONDITION: errors.FailedPrecondition,
}

_BILLING: dict[grpc.StatusCode, type[errors.DomainError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: errors.InvalidInput,
    grpc.StatusCode.RESOURCE_EXHAUSTED: errors.BudgetExceeded,
    grpc.StatusCode.FAILED_PRECONDITION: errors.FailedPrecondition,
    grpc.StatusCode.NOT_FOUND: errors.NotFound,
    grpc.StatusCode.PERMISSION_DENIED: errors.BudgetExceeded,
}


def inference_error(exc: grpc.aio.AioRpcError, address: str) -> errors.DomainError:
    """Unknown / internal / unavailable answers of a replica are `Unavailable`: safe to retry elsewhere."""
    kind = _INFERENCE.get(exc.code(), errors.Unavailable)
    if kind is errors.Unavailable:
        return errors.Unavailable(f"inference replica {address} failed ({exc.code().name}); retry shortly")
    return kind(exc.details() or exc.code().name)


def billing_error(exc: grpc.aio.AioRpcError) -> errors.DomainError:
    kind = _BILLING.get(exc.code(), errors.Unavailable)
    if kind is errors.Unavailable:
        return errors.Unavailable(f"billing is unavailable ({exc.code().name})")
    if kind is errors.BudgetExceeded:
        return errors.BudgetExceeded(exc.details() or "the budget does not cover this request")
    return kind(exc.details() or exc.code().name)
