"""The one table from domain errors to what each transport answers: a gRPC status, and the HTTP status,
OpenAI error `type` / `code` and headers of the OpenAI-compatible HTTP API.

| domain error        | gRPC                | HTTP | OpenAI type           | OpenAI code                    | headers        |
|---------------------|---------------------|------|-----------------------|--------------------------------|----------------|
| InvalidInput        | INVALID_ARGUMENT    | 400  | invalid_request_error | invalid_value (see REASON_CODES) |              |
| NotFound            | NOT_FOUND           | 404  | invalid_request_error | not_found; model_not_found     |                |
| AlreadyExists       | ALREADY_EXISTS      | 409  | invalid_request_error | already_exists                 |                |
| FailedPrecondition  | FAILED_PRECONDITION | 400  | invalid_request_error | failed_precondition            |                |
| Unauthenticated     | UNAUTHENTICATED     | 401  | invalid_request_error | invalid_api_key                |                |
| PermissionDenied    | PERMISSION_DENIED   | 403  | permission_error      | permission_denied              |                |
| QuotaExceeded       | RESOURCE_EXHAUSTED  | 429  | requests              | rate_limit_exceeded            | retry-after(-ms) |
| RateLimited         | RESOURCE_EXHAUSTED  | 429  | requests              | rate_limit_exceeded            | retry-after(-ms) |
| BudgetExceeded      | RESOURCE_EXHAUSTED  | 429  | insufficient_quota    | insufficient_quota             | x-should-retry: false |
| QueueFull           | RESOURCE_EXHAUSTED  | 503  | server_error          | overloaded                     | retry-after(-ms) |
| Unavailable/NotReady| UNAVAILABLE         | 503  | server_error          | service_unavailable            | retry-after(-ms) |
| DeadlineExceeded    | DEADLINE_EXCEEDED   | 504  | timeout               | deadline_exceeded              |                |
| Cancelled           | CANCELLED           | 499  | request_cancelled     | cancelled                      |                |
| NotImplementedYet   | UNIMPLEMENTED       | 501  | invalid_request_error | not_implemented                |                |
| anything else       | INTERNAL            | 500  | server_error          | internal_error                 |                |

Rows are matched along the error's class hierarchy (the most specific row wins). Budget exhaustion is
RESOURCE_EXHAUSTED on gRPC (reason BUDGET_EXCEEDED, never retried) and OpenAI's own 429
`insufficient_quota` on HTTP with `x-should-retry: false`, so SDKs do not retry it. This module has no
transport imports: `error_mapping` (gRPC) and `services.router.http` (HTTP) read it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from services.common import errors


@dataclass(frozen=True)
class ErrorRow:
    grpc: str  # a grpc.StatusCode name
    http: int
    type: str
    code: str
    # retry-after for a 503 when the error names no delay; 0: no header unless the error has a delay.
    default_retry_after_s: float = 0.0
    # False: answered with `x-should-retry: false` (waiting does not help); None: the client's policy decides.
    should_retry: bool | None = None


ERROR_TABLE: dict[type[errors.DomainError], ErrorRow] = {
    errors.InvalidInput: ErrorRow("INVALID_ARGUMENT", 400, "invalid_request_error", "invalid_value"),
    errors.NotFound: ErrorRow("NOT_FOUND", 404, "invalid_request_error", "not_found"),
    errors.AlreadyExists: ErrorRow("ALREADY_EXISTS", 409, "invalid_request_error", "already_exists"),
    errors.FailedPrecondition: ErrorRow("FAILED_PRECONDITION", 400, "invalid_request_error", "failed_precondition"),
    errors.Unauthenticated: ErrorRow("UNAUTHENTICATED", 401, "invalid_request_error", "invalid_api_key"),
    errors.PermissionDenied: ErrorRow("PERMISSION_DENIED", 403, "permission_error", "permission_denied"),
    errors.QuotaExceeded: ErrorRow("RESOURCE_EXHAUSTED", 429, "requests", "rate_limit_exceeded"),
    errors.RateLimited: ErrorRow("RESOURCE_EXHAUSTED", 429, "requests", "rate_limit_exceeded"),
    errors.BudgetExceeded: ErrorRow("RESOURCE_EXHAUSTED", 429, "insufficient_quota", "insufficient_quota",
                                    should_retry=False),
    errors.QueueFull: ErrorRow("RESOURCE_EXHAUSTED", 503, "server_error", "overloaded", default_retry_after_s=1.0),
    errors.Unavailable: ErrorRow("UNAVAILABLE", 503, "server_error", "service_unavailable",
                                 default_retry_after_s=1.0),
    errors.DeadlineExceeded: ErrorRow("DEADLINE_EXCEEDED", 504, "timeout", "deadline_exceeded"),
    errors.Cancelled: ErrorRow("CANCELLED", 499, "request_cancelled", "cancelled"),
    errors.NotImplementedYet: ErrorRow("UNIMPLEMENTED", 501, "invalid_request_error", "not_implemented"),
}
INTERNAL_ROW = ErrorRow("INTERNAL", 500, "server_error", "internal_error")
# A failure inside the mesh that the caller did not cause (e.g. a peer's unexpected answer): its message is
# already generic, so it is answered like an unexpected exception but keeps its ErrorDetail.
ERROR_TABLE[errors.Internal] = INTERNAL_ROW

# A more precise OpenAI code for some reasons and fields of an error.
REASON_CODES = {
    "CONTEXT_LENGTH_EXCEEDED": "context_length_exceeded",
    "UNSUPPORTED_PARAMETER": "unsupported_parameter",
    "UNKNOWN_PARAMETER": "unknown_parameter",
    "MALFORMED_REQUEST": "invalid_json",
}
FIELD_CODES = {(errors.NotFound, "model"): "model_not_found"}


def row_for(error: BaseException) -> ErrorRow:
    """The most specific row of ERROR_TABLE along the error's class hierarchy (INTERNAL_ROW for others)."""
    for klass in type(error).__mro__:
        row = ERROR_TABLE.get(klass)  # type: ignore[call-overload]
        if row is not None:
            return row
    return INTERNAL_ROW


@dataclass(frozen=True)
class HttpAnswer:
    status: int
    type: str
    code: str
    headers: dict[str, str]


def http_answer(error: BaseException) -> HttpAnswer:
    """HTTP status, OpenAI type and code, and headers for `error`."""
    row = row_for(error)
    code = row.code
    if isinstance(error, errors.DomainError):
        code = REASON_CODES.get(error.reason, code)
        for (klass, field), field_code in FIELD_CODES.items():
            if isinstance(error, klass) and error.field == field:
                code = field_code
    headers: dict[str, str] = {}
    delay = float(getattr(error, "retry_after_s", 0.0) or 0.0) or row.default_retry_after_s
    if delay > 0:
        headers["retry-after"] = str(max(1, math.ceil(delay)))
        headers["retry-after-ms"] = str(max(1, round(delay * 1000)))
    if row.should_retry is not None:
        headers["x-should-retry"] = "true" if row.should_retry else "false"
    return HttpAnswer(row.http, row.type, code, headers)
