"""The peer-error table: only transport failures count as a peer being down, a budget refusal is known by
billing's ErrorDetail and not by the bare code, and whatever a sidecar or the gRPC library wrote (SPIFFE
ids, internal method names) never reaches the caller's message."""

from __future__ import annotations

import grpc
import pytest
from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2, status_pb2

from autoglm.common.v1 import error_details_pb2 as autoglm_details
from services.common import errors
from services.common.peer_errors import TABLE, Peer, billing_error, inference_error

SIDECAR_DENIAL = ("spiffe://autoglm.local/ns/default/sa/router may not call /autoglm.billing.v1.BillingService/Reserve"
                  " on billing (mesh policy)")


def rpc_error(code: grpc.StatusCode, details: str, reason: str = "", retry_after_s: float = 0.0,
              **metadata: str) -> grpc.aio.AioRpcError:
    """A failed call as the client sees it; with `reason`, as the peer service's own error mapping wrote it."""
    trailing = grpc.aio.Metadata()
    if reason:
        packed = any_pb2.Any()
        packed.Pack(autoglm_details.ErrorDetail(reason=reason, field="budget", metadata=metadata))
        details_list = [packed]
        if retry_after_s:
            delay = duration_pb2.Duration()
            delay.FromMilliseconds(int(retry_after_s * 1000))
            retry = any_pb2.Any()
            retry.Pack(error_details_pb2.RetryInfo(retry_delay=delay))
            details_list.append(retry)
        status = status_pb2.Status(code=code.value[0], message=details, details=details_list)
        trailing.add("grpc-status-details-bin", status.SerializeToString())
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), trailing, details=details)


def leaks(message: str) -> bool:
    return "spiffe://" in message or "/autoglm." in message or "Service/" in message


def test_billing_refusing_a_hold_is_a_budget_refusal_with_its_message_and_metadata() -> None:
    error = billing_error(rpc_error(grpc.StatusCode.RESOURCE_EXHAUSTED, "monthly budget b1 is exhausted",
                                    reason="BUDGET_EXCEEDED", budget_id="b1", level="EMERGENCY"))
    assert isinstance(error, errors.BudgetExceeded)
    assert error.message == "monthly budget b1 is exhausted"
    assert error.metadata == {"budget_id": "b1", "level": "EMERGENCY"} and error.field == "budget"


def test_a_mesh_policy_denial_is_internal_not_a_budget_refusal_and_names_no_identity() -> None:
    error = billing_error(rpc_error(grpc.StatusCode.PERMISSION_DENIED, SIDECAR_DENIAL))
    assert isinstance(error, errors.Internal) and not isinstance(error, errors.QuotaExceeded)
    assert not leaks(error.message) and "trace id" in error.message


def test_a_resource_exhausted_without_billings_budget_reason_is_not_a_budget_refusal() -> None:
    sidecar_limit = billing_error(rpc_error(grpc.StatusCode.RESOURCE_EXHAUSTED, "rate limit of route billing exceeded"))
    assert type(sidecar_limit) is errors.Unavailable  # refused, retry later; not "billing is down"
    other_reason = billing_error(rpc_error(grpc.StatusCode.RESOURCE_EXHAUSTED, "busy", reason="QUEUE_FULL"))
    assert not isinstance(other_reason, errors.BudgetExceeded)


@pytest.mark.parametrize("code", [grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED])
def test_only_transport_failures_mean_billing_is_unreachable(code: grpc.StatusCode) -> None:
    error = billing_error(rpc_error(code, "failed to connect to all addresses; last error: 127.0.0.1:1 refused"))
    assert isinstance(error, errors.PeerUnreachable) and not leaks(error.message) and "127.0.0.1" not in error.message


@pytest.mark.parametrize("code", [c for c in grpc.StatusCode if c not in (
    grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)])
def test_no_other_billing_status_counts_as_billing_being_down(code: grpc.StatusCode) -> None:
    assert not isinstance(billing_error(rpc_error(code, SIDECAR_DENIAL)), errors.PeerUnreachable)
    assert not isinstance(billing_error(rpc_error(code, "x", reason="SOMETHING")), errors.PeerUnreachable)


@pytest.mark.parametrize("peer", list(Peer))
@pytest.mark.parametrize("code", [c for c in grpc.StatusCode if c is not grpc.StatusCode.OK])
def test_what_a_sidecar_or_the_grpc_library_wrote_never_reaches_the_caller(peer: Peer, code: grpc.StatusCode) -> None:
    exc = rpc_error(code, SIDECAR_DENIAL)
    error = billing_error(exc) if peer is Peer.BILLING else inference_error(exc, "10.0.0.7:50071")
    assert isinstance(error, errors.DomainError)
    assert not leaks(error.message) and "10.0.0.7" not in error.message and error.message
    if code not in TABLE[peer]:
        assert isinstance(error, errors.Internal)


@pytest.mark.parametrize(("code", "kind"), [
    (grpc.StatusCode.INVALID_ARGUMENT, errors.InvalidInput),
    (grpc.StatusCode.NOT_FOUND, errors.NotFound),
    (grpc.StatusCode.FAILED_PRECONDITION, errors.FailedPrecondition),
])
def test_billings_own_answers_keep_their_message_and_field(code: grpc.StatusCode, kind: type) -> None:
    error = billing_error(rpc_error(code, "no price for model m at this time", reason=kind.reason))
    assert type(error) is kind and error.message == "no price for model m at this time" and error.field == "budget"


@pytest.mark.parametrize("code", [grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.DATA_LOSS,
                                  grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED])
def test_a_replicas_unexpected_answer_is_internal_and_not_retried_elsewhere(code: grpc.StatusCode) -> None:
    error = inference_error(rpc_error(code, "Exception calling application: boom"), "10.0.0.7:50071")
    assert isinstance(error, errors.Internal) and not isinstance(error, errors.Unavailable | errors.QueueFull)
    assert "boom" not in error.message


def test_a_replica_that_cannot_be_reached_or_is_full_is_retried_elsewhere() -> None:
    down = inference_error(rpc_error(grpc.StatusCode.UNAVAILABLE, "Socket closed"), "10.0.0.7:50071")
    assert isinstance(down, errors.PeerUnreachable)
    full = inference_error(rpc_error(grpc.StatusCode.RESOURCE_EXHAUSTED, "queue of 64 is full", reason="QUEUE_FULL",
                                     retry_after_s=0.5), "10.0.0.7:50071")
    assert isinstance(full, errors.QueueFull) and full.retry_after_s == 0.5 and full.message == "queue of 64 is full"


def test_a_replicas_own_invalid_input_passes_with_its_message() -> None:
    error = inference_error(rpc_error(grpc.StatusCode.INVALID_ARGUMENT, "the prompt is 9000 tokens; the window is 8192",
                                      reason="INVALID_INPUT"), "10.0.0.7:50071")
    assert type(error) is errors.InvalidInput and "9000 tokens" in error.message
