"""POST /v1/chat/completions."""

from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.responses import Response

from services.router.http.deps import Caller, backend
from services.router.http.openai import convert
from services.router.http.openai.generation import answer
from services.router.http.openai.protocol import ChatCompletion, ChatCompletionRequest, ErrorBody
from services.router.http.route import GenerationRoute

router = APIRouter(route_class=GenerationRoute)
ERRORS = {code: {"model": ErrorBody} for code in (400, 401, 403, 404, 429, 500, 503)}


@router.post("/v1/chat/completions", response_model=ChatCompletion, responses=ERRORS,  # type: ignore[arg-type]
             summary="Chat completion (streamed as Server-Sent Events with stream: true)")
async def create_chat_completion(body: ChatCompletionRequest, request: Request,
                                 caller: Caller) -> Response:
    return await answer(request, backend(request), caller, body, convert.chat_request(body), chat=True)
