"""`GenerationRoute`: the route class of the generation endpoints, `async def f(body: <wire model>, request:
Request, caller: Caller) -> Response`.

FastAPI documents such a route from its signature as usual (`/openapi.json`), but answers it without its
generic request handler (per-request endpoint context, dependency solving, content-type parsing through
`email.message`): the steps are fixed and done here in FastAPI's order, with its errors: the body is read
and parsed as JSON when its content type is JSON (400 `json_invalid`, or 400 when it cannot be read), the
caller is authenticated (401), then the body is validated against the model (400 naming the parameter).
"""

from __future__ import annotations

import json
import typing
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

from services.router.http.deps import Caller, principal

Handler = Callable[[Request], Coroutine[Any, Any, Response]]
_NO_BODY = object()


def is_json(content_type: str) -> bool:
    """`application/json` or `application/<x>+json`, parameters ignored (as FastAPI reads it)."""
    kind = content_type.partition(";")[0].strip().lower()
    main, _, sub = kind.partition("/")
    return main == "application" and "/" not in sub and (sub == "json" or sub.endswith("+json"))


class GenerationRoute(APIRoute):
    def get_route_handler(self) -> Handler:
        endpoint, body_field = self.endpoint, self.body_field
        hints = typing.get_type_hints(endpoint, include_extras=True)
        expected = {"request": Request, "caller": Caller}
        if body_field is None or {k: v for k, v in hints.items() if k in expected} != expected or \
                set(hints) != {"body", "request", "caller", "return"} or len(self.dependant.dependencies) != 1:
            raise TypeError(f"{self.path}: a GenerationRoute endpoint takes (body, request: Request, caller: Caller)")

        async def handle(request: Request) -> Response:
            body: Any = _NO_BODY
            try:
                raw = await request.body()
                if raw:
                    content_type = request.headers.get("content-type")
                    body = json.loads(raw) if content_type and is_json(content_type) else raw
            except json.JSONDecodeError as exc:
                raise RequestValidationError([{"type": "json_invalid", "loc": ("body", exc.pos),
                                               "msg": "JSON decode error", "input": {},
                                               "ctx": {"error": exc.msg}}], body=exc.doc) from exc
            except HTTPException:
                raise
            except Exception as exc:
                raise HTTPException(400, "There was an error parsing the body") from exc
            caller = await principal(request)
            if body is _NO_BODY:
                errors: list[Any] = [{"type": "missing", "loc": ("body",), "msg": "Field required", "input": None}]
            else:
                body, errors = body_field.validate(body, loc=("body",))
            if errors:
                raise RequestValidationError(errors, body=body)
            return await endpoint(body=body, request=request, caller=caller)  # type: ignore[no-any-return]

        return handle
