"""gRPC servicers of the router: thin conversions between messages and the router's domain."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator

import grpc

from autoglm.router.v1 import admin_service_pb2 as admin_pb2
from autoglm.router.v1 import admin_service_pb2_grpc as admin_grpc
from autoglm.router.v1 import router_service_pb2 as pb2
from autoglm.router.v1 import router_service_pb2_grpc as pb2_grpc
from services.common.tracing import current_request_id, current_trace_id
from services.router import convert, offload
from services.router.app import RouterApp
from services.router.jobs.model import JobState
from services.router.tasks import LengthUnit, OutputFormat, TaskKind, TaskSpec
from services.router.types import GenerationRequest, Principal, RequestContext, Summary, TrafficClass


def _metadata(context: grpc.aio.ServicerContext) -> dict[str, str]:
    return {k: v for k, v in (context.invocation_metadata() or ()) if isinstance(v, str)}


class RouterServicer(pb2_grpc.RouterServiceServicer):
    def __init__(self, app: RouterApp) -> None:
        self._app = app

    def _principal(self, context: grpc.aio.ServicerContext) -> Principal:
        return self._app.authenticator.authenticate(_metadata(context).get("authorization", ""))

    def _context(self, context: grpc.aio.ServicerContext, tags: dict[str, str]) -> RequestContext:
        metadata = _metadata(context)
        principal = self._app.authenticator.authenticate(metadata.get("authorization", ""))
        merged = {**convert.parse_tags(metadata.get("x-autoglm-tags", "")), **tags}
        # A trace id even when no tracer is installed: from traceparent, else a new one.
        trace_id = current_trace_id() or uuid.uuid4().hex
        remaining = context.time_remaining()
        deadline = time.monotonic() + remaining if remaining is not None else None
        return RequestContext(current_request_id() or uuid.uuid4().hex, trace_id, principal, merged, deadline)

    async def Generate(
        self, request: pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb2.GenerateResponse]:
        self._app.input_limits.check(request.ByteSize(), convert.prompt_texts(request))  # before any other work
        ctx = self._context(context, dict(request.tags))
        async for item in self._app.gateway.generate(ctx, convert.generation_request(request)):
            if isinstance(item, Summary):
                yield pb2.GenerateResponse(id=ctx.request_id, summary=convert.summary(item))
            else:
                yield pb2.GenerateResponse(id=ctx.request_id, delta=item.delta, delta_tokens=item.tokens)

    async def Complete(self, request: pb2.CompleteRequest, context: grpc.aio.ServicerContext) -> pb2.CompleteResponse:
        self._app.input_limits.check(request.ByteSize(), convert.prompt_texts(request))
        ctx = self._context(context, dict(request.tags))
        text, summary = await self._app.gateway.complete(ctx, convert.generation_request(request))
        return pb2.CompleteResponse(
            id=ctx.request_id, choices=[pb2.Choice(index=0, text=text, finish_reason=int(summary.finish_reason))],  # type: ignore[arg-type]
            usage=convert.usage(summary.usage), cost=convert.money(summary.cost), model=summary.model,
            model_version=summary.model_version, trace_id=summary.trace_id,
        )

    async def RunTask(self, request: pb2.RunTaskRequest, context: grpc.aio.ServicerContext) -> pb2.RunTaskResponse:
        self._app.input_limits.check(request.ByteSize(), convert.task_texts(request))
        ctx = self._context(context, dict(request.tags))
        spec = TaskSpec(
            kind=convert.enum_value(TaskKind, request.kind, "kind"), content=request.content, length_unit=convert.enum_value(LengthUnit, request.target_length.unit, "target_length.unit"),
            length_value=request.target_length.value, output_format=convert.enum_value(OutputFormat, request.output_format, "output_format"),
            target_language=request.target_language, labels=tuple(request.labels), fields=tuple(request.fields),
            style=request.style,
        )
        text, summary = await self._app.run_task(ctx, request.model, spec, convert.sampling(request.sampling),
                                                 convert.enum_value(TrafficClass, request.traffic_class, "traffic_class"))
        return pb2.RunTaskResponse(
            id=ctx.request_id, output=text, finish_reason=int(summary.finish_reason),  # type: ignore[arg-type]
            usage=convert.usage(summary.usage), cost=convert.money(summary.cost), model=summary.model,
            model_version=summary.model_version,
        )

    async def CountTokens(
        self, request: pb2.CountTokensRequest, context: grpc.aio.ServicerContext
    ) -> pb2.CountTokensResponse:
        self._app.input_limits.check(request.ByteSize(), convert.prompt_texts(request))
        count, window, model, version = await self._app.gateway.count_tokens(
            self._principal(context), request.model, request.prompt, convert.messages(request.messages),
            request.raw_prompt,
        )
        return pb2.CountTokensResponse(token_count=count, context_window=window, model=model, model_version=version)

    async def ListModels(
        self, request: pb2.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> pb2.ListModelsResponse:
        models = self._app.gateway.callable_models(self._principal(context))
        return pb2.ListModelsResponse(
            models=[convert.model_summary(m, self._app.healthy_replicas(m)) for m in models]
        )

    async def SubmitBatch(
        self, request: pb2.SubmitBatchRequest, context: grpc.aio.ServicerContext
    ) -> pb2.SubmitBatchResponse:
        for texts in convert.batch_item_texts(request):  # each item is one generation's prompt
            self._app.input_limits.check_prompt(texts, what="a batch item's prompt")
        job = self._app.jobs.submit(self._principal(context), convert.new_job(request))
        return pb2.SubmitBatchResponse(job=convert.job(job))

    async def GetJob(self, request: pb2.GetJobRequest, context: grpc.aio.ServicerContext) -> pb2.GetJobResponse:
        return pb2.GetJobResponse(job=convert.job(self._app.jobs.get(self._principal(context), request.job_id)))

    async def ListJobs(self, request: pb2.ListJobsRequest, context: grpc.aio.ServicerContext) -> pb2.ListJobsResponse:
        jobs, token = self._app.jobs.list(self._principal(context), convert.enum_value(JobState, request.state, "state"), request.page_size,
                                          request.page_token)
        return pb2.ListJobsResponse(jobs=[convert.job(j) for j in jobs], next_page_token=token)

    async def CancelJob(
        self, request: pb2.CancelJobRequest, context: grpc.aio.ServicerContext
    ) -> pb2.CancelJobResponse:
        job = await self._app.jobs.cancel(self._principal(context), request.job_id)
        return pb2.CancelJobResponse(job=convert.job(job))


class AdminServicer(admin_grpc.AdminServiceServicer):
    def __init__(self, app: RouterApp) -> None:
        self._app = app

    def _admin(self, context: grpc.aio.ServicerContext) -> None:
        self._app.authenticator.authenticate_admin(_metadata(context).get("authorization", ""))

    async def CreateApiKey(
        self, request: admin_pb2.CreateApiKeyRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.CreateApiKeyResponse:
        self._admin(context)
        record, secret = self._app.create_key(convert.new_api_key(request))
        return admin_pb2.CreateApiKeyResponse(api_key=convert.api_key(record), secret=secret)

    async def ListApiKeys(
        self, request: admin_pb2.ListApiKeysRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.ListApiKeysResponse:
        self._admin(context)
        records = self._app.keys.list(request.tenant_id, request.include_revoked)
        return admin_pb2.ListApiKeysResponse(api_keys=[convert.api_key(r) for r in records])

    async def RevokeApiKey(
        self, request: admin_pb2.RevokeApiKeyRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.RevokeApiKeyResponse:
        self._admin(context)
        return admin_pb2.RevokeApiKeyResponse(api_key=convert.api_key(self._app.revoke_key(request.key_id)))

    async def RegisterModelVersion(
        self, request: admin_pb2.RegisterModelVersionRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.RegisterModelVersionResponse:
        self._admin(context)
        model = await self._app.register(
            request.model, request.version, tuple(r.address for r in request.replicas),
            tuple(request.fallback_models), convert.canary_policy(request.canary_policy),
            convert.default_sampling(request),
        )
        return admin_pb2.RegisterModelVersionResponse(model=self._record(model.name))

    async def SetTrafficSplit(
        self, request: admin_pb2.SetTrafficSplitRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.SetTrafficSplitResponse:
        self._admin(context)
        self._app.registry.set_split(request.model, {w.version: w.weight_permille for w in request.weights})
        return admin_pb2.SetTrafficSplitResponse(model=self._record(request.model))

    async def PromoteVersion(
        self, request: admin_pb2.PromoteVersionRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.PromoteVersionResponse:
        self._admin(context)
        self._app.registry.promote(request.model, request.version)
        return admin_pb2.PromoteVersionResponse(model=self._record(request.model))

    async def RollbackVersion(
        self, request: admin_pb2.RollbackVersionRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.RollbackVersionResponse:
        self._admin(context)
        self._app.registry.rollback(request.model, request.reason or "manual rollback")
        return admin_pb2.RollbackVersionResponse(model=self._record(request.model))

    async def GetModel(
        self, request: admin_pb2.GetModelRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.GetModelResponse:
        self._admin(context)
        return admin_pb2.GetModelResponse(model=self._record(request.model))

    async def SetPolicy(
        self, request: admin_pb2.SetPolicyRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.SetPolicyResponse:
        self._admin(context)
        policy = convert.policy_from_proto(request.policy)
        # Building the matcher of 10,000 long terms takes a while: off the event loop.
        stored = await offload.sized(sum(map(len, policy.blocked_terms)), self._app.set_policy, request.tenant_id,
                                     policy)
        return admin_pb2.SetPolicyResponse(policy=convert.policy_to_proto(stored))

    async def GetPolicy(
        self, request: admin_pb2.GetPolicyRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.GetPolicyResponse:
        self._admin(context)
        return admin_pb2.GetPolicyResponse(policy=convert.policy_to_proto(self._app.policies.for_tenant(request.tenant_id)))

    async def ListAuditEvents(
        self, request: admin_pb2.ListAuditEventsRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.ListAuditEventsResponse:
        self._admin(context)
        events, next_token = self._app.registry.audit_page(request.action, request.page_size, request.page_token)
        return admin_pb2.ListAuditEventsResponse(events=[convert.audit_event(e) for e in events],
                                                 next_page_token=next_token)

    def _record(self, name: str) -> admin_pb2.ModelRecord:
        model = self._app.registry.get(name)
        return convert.model_record(model, self._app.healthy_replicas(model))


__all__ = ["AdminServicer", "GenerationRequest", "RouterServicer"]
