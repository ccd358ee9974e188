"""`build_app(backend, settings)`: the OpenAI-compatible HTTP API as an ASGI app over the router's gateway.

Routes: POST /v1/chat/completions, POST /v1/completions, GET /v1/models, GET /v1/models/{id},
GET /health (liveness, open), GET /ready (the router's store reachable and a model with a healthy replica;
open), /openapi.json and /docs; with a `Console`, the operator console under /console/
(`console/routes.py`). Errors are OpenAI error bodies with the one error table's statuses; never a traceback.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from services.common.errors import DomainError
from services.router.http import errors
from services.router.http.console.routes import Console
from services.router.http.console.routes import install as install_console
from services.router.http.deps import Backend, backend
from services.router.http.middleware import BodyLimit, BodyTimeout, RequestIds
from services.router.http.openai import chat, completions, models


@dataclass(frozen=True)
class HttpSettings:
    title: str = "Open-AutoGLM OpenAI-compatible API"
    # Request bodies larger than this are refused with 413 before they are parsed.
    max_body_bytes: int = 4 * 1024 * 1024
    # A body not received in full this long after its request began is refused with 408.
    body_timeout_s: float = 30.0


def build_app(parts: Backend, settings: HttpSettings | None = None, console: Console | None = None) -> FastAPI:
    settings = settings or HttpSettings()
    # FastAPI's built-in telemetry off: RequestIds makes the one server span (ids as the gRPC side), and the
    # router's Prometheus metrics count requests; FastAPI's would add a span per dependency, endpoint and
    # serialization to every call (and about a third of the HTTP layer's time).
    app = FastAPI(title=settings.title, version="1", telemetry={
        "tracing": False, "metrics": False, "logs": False, "operation_spans": False})
    app.state.backend = parts
    app.state.started = int(time.time())
    app.state.settings = settings
    app.include_router(chat.router)
    app.include_router(completions.router)
    app.include_router(models.router)
    app.add_exception_handler(DomainError, errors.on_domain_error)
    app.add_exception_handler(RequestValidationError, errors.on_validation_error)
    app.add_exception_handler(HTTPException, errors.on_http_exception)
    app.add_exception_handler(Exception, errors.on_unexpected)
    if console is not None:  # after the error handlers: its pages answer errors as a page
        install_console(app, console)
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(BodyTimeout, timeout_s=settings.body_timeout_s)
    app.add_middleware(RequestIds)  # outermost: every answer carries the ids

    @app.get("/health", include_in_schema=False)
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/ready", include_in_schema=False)
    async def ready(request: Request) -> JSONResponse:
        parts = backend(request)
        if not parts.store_available():
            return JSONResponse(errors.error_body("the router's database cannot be reached", "server_error",
                                                  "service_unavailable", None), 503, {"retry-after": "1"})
        served = [m.name for m in parts.gateway.registry.models() if any(parts.healthy_replicas(m).values())]
        if served:
            return JSONResponse({"status": "ready", "models": served})
        return JSONResponse(errors.error_body("no model has a healthy replica yet", "server_error",
                                              "service_unavailable", None), 503, {"retry-after": "1"})

    return app
