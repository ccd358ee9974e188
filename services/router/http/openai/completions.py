"""POST /v1/completions (the prompt is continued as raw text, without the chat template)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.responses import Response

from services.router.http.deps import Caller, backend
from services.router.http.openai import convert
from services.router.http.openai.chat import ERRORS
from services.router.http.openai.generation import answer
from services.router.http.openai.protocol import Completion, CompletionRequest
from services.router.http.route import GenerationRoute

router = APIRouter(route_class=GenerationRoute)


@router.post("/v1/completions", response_model=Completion, responses=ERRORS,  # type: ignore[arg-type]
             summary="Text completion (streamed as Server-Sent Events with stream: true)")
async def create_completion(body: CompletionRequest, request: Request,
                            caller: Caller) -> Response:
    return await answer(request, backend(request), caller, body, convert.completion_request(body), chat=False)
