"""gRPC servicers of the router: thin conversions between messages and the router's domain.

RouterServicer runs over `RouterPorts` (the gateway, jobs, tasks; RouterApp provides them), AdminServicer
over `Admin`. Who may call which method is declared where the server is built (`server.RPC_AUTH`)."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from typing import Protocol

import grpc

from autoglm.router.v1 import admin_service_pb2 as admin_pb2
from autoglm.router.v1 import admin_service_pb2_grpc as admin_grpc
from autoglm.router.v1 import router_service_pb2 as pb2
from autoglm.router.v1 import router_service_pb2_grpc as pb2_grpc
from services.common.generation import TrafficClass
from services.common.tracing import current_request_id, current_span_id, current_trace_id
from services.router import convert, rpc_auth, workflow_convert
from services.router.admin import Admin
from services.router.auth.authenticator import Authenticator
from services.router.gateway import Gateway
from services.router.input_limits import InputLimits
from services.router.jobs.model import JobState
from services.router.jobs.service import Jobs
from services.router.registry import ModelEntry
from services.router.tasks import LengthUnit, OutputFormat, TaskKind, TaskSpec
from services.router.types import GenerationRequest, Principal, RequestContext, Summary
from services.router.workflows.service import Workflows


class RouterPorts(Protocol):
    """What RouterService runs on."""

    gateway: Gateway
    authenticator: Authenticator
    input_limits: InputLimits
    jobs: Jobs
    workflows: Workflows

    def healthy_replicas(self, model: ModelEntry) -> dict[str, int]: ...


DEPRECATION_KEY = "autoglm-deprecation"  # trailing metadata of a request pinned to a DEPRECATED version


def _metadata(context: grpc.aio.ServicerContext) -> dict[str, str]:
    return {k: v for k, v in (context.invocation_metadata() or ()) if isinstance(v, str)}


class RouterServicer(pb2_grpc.RouterServiceServicer):
    def __init__(self, app: RouterPorts) -> None:
        self._app = app

    def _principal(self, context: grpc.aio.ServicerContext) -> Principal:
        """The caller, as the server's auth table authenticated it (asked for after the size checks)."""
        return rpc_auth.principal(
            lambda: self._app.authenticator.authenticate(_metadata(context).get("authorization", "")))

    def _context(self, context: grpc.aio.ServicerContext, tags: dict[str, str]) -> RequestContext:
        metadata = _metadata(context)
        principal = self._principal(context)
        merged = {**convert.parse_tags(metadata.get("x-autoglm-tags", "")), **tags}
        # A trace id even when no tracer is installed: from traceparent, else a new one.
        trace_id = current_trace_id() or uuid.uuid4().hex
        remaining = context.time_remaining()
        deadline = time.monotonic() + remaining if remaining is not None else None
        return RequestContext(current_request_id() or uuid.uuid4().hex, trace_id, principal, merged, deadline,
                              span_id=current_span_id())

    def _deprecation(self, context: grpc.aio.ServicerContext, model: str) -> None:
        if (notice := self._app.gateway.deprecation(model)) is not None:
            context.set_trailing_metadata(((DEPRECATION_KEY, notice.notice),))

    async def Generate(
        self, request: pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb2.GenerateResponse]:
        self._app.input_limits.check(request.ByteSize(), convert.prompt_texts(request))  # before any other work
        ctx = self._context(context, dict(request.tags))
        self._deprecation(context, request.model)
        async for item in self._app.gateway.generate(ctx, convert.generation_request(request)):
            if isinstance(item, Summary):
                yield pb2.GenerateResponse(id=ctx.request_id, summary=convert.summary(item))
            else:
                yield pb2.GenerateResponse(id=ctx.request_id, delta=item.delta, delta_tokens=item.tokens)

    async def Complete(self, request: pb2.CompleteRequest, context: grpc.aio.ServicerContext) -> pb2.CompleteResponse:
        self._app.input_limits.check(request.ByteSize(), convert.prompt_texts(request))
        ctx = self._context(context, dict(request.tags))
        text, summary = await self._app.gateway.complete(ctx, convert.generation_request(request))
        self._deprecation(context, request.model)
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
        text, summary = await self._app.gateway.run_task(
            ctx, request.model, spec, convert.sampling(request.sampling),
            convert.enum_value(TrafficClass, request.traffic_class, "traffic_class"))
        self._deprecation(context, request.model)
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
        job = await self._app.jobs.submit(self._principal(context), convert.new_job(request))
        return pb2.SubmitBatchResponse(job=convert.job(job))

    async def GetJob(self, request: pb2.GetJobRequest, context: grpc.aio.ServicerContext) -> pb2.GetJobResponse:
        return pb2.GetJobResponse(job=convert.job(await self._app.jobs.get(self._principal(context), request.job_id)))

    async def ListJobs(self, request: pb2.ListJobsRequest, context: grpc.aio.ServicerContext) -> pb2.ListJobsResponse:
        jobs, token = await self._app.jobs.list(self._principal(context), convert.enum_value(JobState, request.state, "state"), request.page_size,
                                                request.page_token)
        return pb2.ListJobsResponse(jobs=[convert.job(j) for j in jobs], next_page_token=token)

    async def CancelJob(
        self, request: pb2.CancelJobRequest, context: grpc.aio.ServicerContext
    ) -> pb2.CancelJobResponse:
        job = await self._app.jobs.cancel(self._principal(context), request.job_id)
        return pb2.CancelJobResponse(job=convert.job(job))

    async def SubmitWorkflow(
        self, request: pb2.SubmitWorkflowRequest, context: grpc.aio.ServicerContext
    ) -> pb2.SubmitWorkflowResponse:
        self._app.input_limits.check(request.ByteSize(), workflow_convert.texts(request))
        principal = self._principal(context)
        submitted, worst = await self._app.workflows.submit(principal, workflow_convert.new_workflow(request))
        return pb2.SubmitWorkflowResponse(
            workflow=workflow_convert.workflow(submitted) if submitted is not None else None,
            estimate=workflow_convert.estimate(worst))

    async def GetWorkflow(
        self, request: pb2.GetWorkflowRequest, context: grpc.aio.ServicerContext
    ) -> pb2.GetWorkflowResponse:
        found = self._app.workflows.get(self._principal(context), request.workflow_id)
        return pb2.GetWorkflowResponse(workflow=workflow_convert.workflow(found))

    async def ListWorkflows(
        self, request: pb2.ListWorkflowsRequest, context: grpc.aio.ServicerContext
    ) -> pb2.ListWorkflowsResponse:
        found, token = self._app.workflows.list(self._principal(context), workflow_convert.state(request.state),
                                                request.page_size, request.page_token)
        return pb2.ListWorkflowsResponse(workflows=[workflow_convert.workflow(w, detail=False) for w in found],
                                         next_page_token=token)

    async def CancelWorkflow(
        self, request: pb2.CancelWorkflowRequest, context: grpc.aio.ServicerContext
    ) -> pb2.CancelWorkflowResponse:
        cancelled = await self._app.workflows.cancel(self._principal(context), request.workflow_id)
        return pb2.CancelWorkflowResponse(workflow=workflow_convert.workflow(cancelled))

    async def WatchWorkflow(
        self, request: pb2.WatchWorkflowRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb2.WatchWorkflowResponse]:
        async for node, current in self._app.workflows.watch(self._principal(context), request.workflow_id):
            yield pb2.WatchWorkflowResponse(
                node=workflow_convert.node_status(node), workflow_state=int(current.state),  # type: ignore[arg-type]
                usage=convert.usage(current.usage), cost=convert.money(current.cost))


class AdminServicer(admin_grpc.AdminServiceServicer):
    """A thin transport over `Admin` (the server's auth table has checked the admin token)."""

    def __init__(self, admin: Admin) -> None:
        self._admin = admin

    async def CreateApiKey(
        self, request: admin_pb2.CreateApiKeyRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.CreateApiKeyResponse:
        record, secret = await self._admin.create_key(convert.new_api_key(request))
        return admin_pb2.CreateApiKeyResponse(api_key=convert.api_key(record), secret=secret)

    async def ListApiKeys(
        self, request: admin_pb2.ListApiKeysRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.ListApiKeysResponse:
        records = await self._admin.list_keys(request.tenant_id, request.include_revoked)
        return admin_pb2.ListApiKeysResponse(api_keys=[convert.api_key(r) for r in records])

    async def RevokeApiKey(
        self, request: admin_pb2.RevokeApiKeyRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.RevokeApiKeyResponse:
        return admin_pb2.RevokeApiKeyResponse(api_key=convert.api_key(await self._admin.revoke_key(request.key_id)))

    async def RegisterModelVersion(
        self, request: admin_pb2.RegisterModelVersionRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.RegisterModelVersionResponse:
        model = await self._admin.register(
            request.model, request.version, tuple(r.address for r in request.replicas),
            tuple(request.fallback_models), convert.canary_policy(request.canary_policy),
            convert.default_sampling(request),
            convert.version_state(request.initial_state, "initial_state") if request.HasField("initial_state")
            else None,
        )
        return admin_pb2.RegisterModelVersionResponse(model=await self._record(self._admin.get_model(model.name)))

    async def SetTrafficSplit(
        self, request: admin_pb2.SetTrafficSplitRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.SetTrafficSplitResponse:
        model = await self._admin.set_split(request.model, {w.version: w.weight_permille for w in request.weights})
        return admin_pb2.SetTrafficSplitResponse(model=await self._record(model))

    async def PromoteVersion(
        self, request: admin_pb2.PromoteVersionRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.PromoteVersionResponse:
        model = await self._admin.promote(request.model, request.version)
        return admin_pb2.PromoteVersionResponse(model=await self._record(model))

    async def RollbackVersion(
        self, request: admin_pb2.RollbackVersionRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.RollbackVersionResponse:
        model = await self._admin.rollback(request.model, request.reason)
        return admin_pb2.RollbackVersionResponse(model=await self._record(model))

    async def GetModel(
        self, request: admin_pb2.GetModelRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.GetModelResponse:
        return admin_pb2.GetModelResponse(model=await self._record(self._admin.get_model(request.model)))

    async def SetPolicy(
        self, request: admin_pb2.SetPolicyRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.SetPolicyResponse:
        stored = await self._admin.set_policy(request.tenant_id, convert.policy_from_proto(request.policy))
        return admin_pb2.SetPolicyResponse(policy=convert.policy_to_proto(stored))

    async def GetPolicy(
        self, request: admin_pb2.GetPolicyRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.GetPolicyResponse:
        return admin_pb2.GetPolicyResponse(policy=convert.policy_to_proto(self._admin.get_policy(request.tenant_id)))

    async def ListAuditEvents(
        self, request: admin_pb2.ListAuditEventsRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.ListAuditEventsResponse:
        events, next_token = await self._admin.audit_page(request.action, request.page_size, request.page_token)
        return admin_pb2.ListAuditEventsResponse(events=[convert.audit_event(e) for e in events],
                                                 next_page_token=next_token)

    async def SetVersionState(
        self, request: admin_pb2.SetVersionStateRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.SetVersionStateResponse:
        model = await self._admin.set_state(request.model, request.version,
                                            convert.version_state(request.state, "state"), request.operator,
                                            request.reason)
        return admin_pb2.SetVersionStateResponse(model=await self._record(model))

    async def _record(self, model: ModelEntry) -> admin_pb2.ModelRecord:
        return convert.model_record(model, self._admin.healthy_replicas(model), await self._admin.history(model.name))


__all__ = ["AdminServicer", "GenerationRequest", "RouterServicer"]
