"""GET /v1/models and /v1/models/{id}: the models this key may call, with versions and canary split."""

from __future__ import annotations

from fastapi import APIRouter, Request

from services.router.http.deps import Caller, backend
from services.router.http.openai import convert
from services.router.http.openai.chat import ERRORS
from services.router.http.openai.protocol import ModelCard, ModelList
from services.router.registry import split_model

router = APIRouter()


@router.get("/v1/models", response_model=ModelList, responses=ERRORS)  # type: ignore[arg-type]
async def list_models(request: Request, caller: Caller) -> ModelList:
    parts, created = backend(request), request.app.state.started
    return ModelList(data=[convert.model_card(m, parts.healthy_replicas(m), created)
                           for m in parts.gateway.callable_models(caller)])


@router.get("/v1/models/{model_id:path}", response_model=ModelCard, responses=ERRORS)  # type: ignore[arg-type]
async def get_model(model_id: str, request: Request, caller: Caller) -> ModelCard:
    parts = backend(request)
    parts.gateway.check_model(caller, model_id)  # 404 model_not_found / 403 permission_denied
    model = parts.gateway.registry.get(split_model(model_id)[0])
    return convert.model_card(model, parts.healthy_replicas(model), request.app.state.started)
