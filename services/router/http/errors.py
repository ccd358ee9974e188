"""Errors the OpenAI way: `{"error": {"message", "type", "param", "code"}}` with the status and headers of
the one error table (`services/common/error_table.py`). Never a traceback: anything unexpected is a 500
with a generic message, and the exception goes to the log under the request's trace id."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import structlog
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse

from services.common.error_mapping import INTERNAL_MESSAGE
from services.common.error_table import REASON_CODES, http_answer
from services.common.errors import DomainError

log = structlog.get_logger("router.http")

# Gateway field names → the OpenAI parameter a caller set.
_PARAMS = {"sampling.max_tokens": "max_tokens", "sampling.temperature": "temperature", "sampling.top_p": "top_p",
           "sampling.top_k": "top_k", "sampling.seed": "seed", "sampling.stop": "stop",
           "sampling.repetition_penalty": "repetition_penalty"}


def param_name(field: str, chat: bool = True) -> str | None:
    """The OpenAI parameter for a gateway field name (`sampling.max_tokens` → `max_tokens`)."""
    if not field:
        return None
    if field in _PARAMS:
        return _PARAMS[field]
    if field == "prompt" and chat:
        return "messages"
    return field.removeprefix("sampling.")


def error_body(message: str, type_: str, code: str | None, param: str | None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def domain_error_parts(error: BaseException, chat: bool = True) -> tuple[int, dict[str, Any], dict[str, str]]:
    """Status, body and headers for any exception (a generic 500 for what is not a DomainError)."""
    answer = http_answer(error)
    if isinstance(error, DomainError):
        return answer.status, error_body(error.message, answer.type, answer.code,
                                         param_name(error.field, chat)), answer.headers
    log.error("unhandled_error", exc_info=error)
    return answer.status, error_body(INTERNAL_MESSAGE, answer.type, answer.code, None), answer.headers


def _loc_param(loc: Sequence[int | str]) -> str | None:
    """("body", "messages", 0, "content") → "messages[0].content"."""
    parts = list(loc[1:] if loc and loc[0] == "body" else loc)
    name = ""
    for part in parts:
        if isinstance(part, int):
            name += f"[{part}]"
        else:
            name += f".{part}" if name else str(part)
    return name or None


def validation_parts(exc: RequestValidationError) -> tuple[int, dict[str, Any]]:
    """A 400 `invalid_request_error` for the first problem pydantic found, naming the parameter."""
    problems = exc.errors()
    first = problems[0] if problems else {"type": "invalid_value", "loc": (), "msg": "invalid request"}
    kind, param = str(first.get("type", "")), _loc_param(first.get("loc", ()))
    message = str(first.get("msg", "invalid value"))
    if kind == "json_invalid":
        context = first.get("ctx")
        error = context.get("error", "") if isinstance(context, dict) else ""
        return 400, error_body(f"the request body is not valid JSON ({error})".replace(" ()", ""),
                               "invalid_request_error", REASON_CODES["MALFORMED_REQUEST"], None)
    if kind == "extra_forbidden":
        return 400, error_body(f"unknown parameter {param!r}", "invalid_request_error",
                               REASON_CODES["UNKNOWN_PARAMETER"], param)
    if kind == "missing":
        message = f"{param} is required" if param else "the request body is required (a JSON object)"
    elif kind == "model_attributes_type" and not param:
        message = "the request body must be a JSON object"
    elif param:
        message = f"{param}: {message.removeprefix('Value error, ')}"
    code = REASON_CODES["UNSUPPORTED_PARAMETER"] if kind == "unsupported_parameter" else "invalid_value"
    return 400, error_body(message, "invalid_request_error", code, param)


# OpenAI-style codes of the framework's own refusals (the body limits).
HTTP_CODES = {408: "request_timeout", 413: "request_too_large"}


def _dumps(body: dict[str, Any]) -> bytes:
    return json.dumps(body, ensure_ascii=False).encode()


async def on_domain_error(request: Request, exc: Exception) -> JSONResponse:
    status, body, headers = domain_error_parts(exc, chat=request.url.path.endswith("/chat/completions"))
    return JSONResponse(body, status, headers)


async def on_validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    status, body = validation_parts(exc)
    return JSONResponse(body, status)


async def on_http_exception(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HTTPException)
    if exc.status_code == 404:
        message = f"no such endpoint: {request.method} {request.url.path}"
    elif exc.status_code == 405:
        message = f"{request.method} is not allowed on {request.url.path}"
    elif exc.status_code == 400 and exc.detail == "There was an error parsing the body":  # FastAPI's own
        message = "the request body could not be read as JSON (it is not UTF-8, or nested too deeply)"
        return JSONResponse(error_body(message, "invalid_request_error", REASON_CODES["MALFORMED_REQUEST"], None), 400)
    else:
        message = str(exc.detail)
    return JSONResponse(error_body(message, "invalid_request_error", HTTP_CODES.get(exc.status_code), None),
                        exc.status_code, dict(exc.headers or {}))


async def on_unexpected(request: Request, exc: Exception) -> JSONResponse:
    status, body, headers = domain_error_parts(exc)
    return JSONResponse(body, status, headers)


def error_event(error: BaseException, chat: bool) -> bytes:
    """The body of the one `data: {"error": …}` event a stream sends when it fails after it started."""
    _, body, _ = domain_error_parts(error, chat)
    return _dumps(body)
