"""gRPC servicers of the router: thin conversions between messages and the router's domain."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from autoglm.router.v1 import admin_service_pb2 as admin_pb2
from autoglm.router.v1 import admin_service_pb2_grpc as admin_grpc
from autoglm.router.v1 import router_service_pb2 as pb2
from autoglm.router.v1 import router_service_pb2_grpc as pb2_grpc
from services.common.errors import NotImplementedYet


def _missing(rpc: str, what: str) -> NotImplementedYet:
    return NotImplementedYet(f"{rpc} is not available in this build: {what} is not implemented yet")


class RouterServicer(pb2_grpc.RouterServiceServicer):
    async def Generate(
        self, request: pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb2.GenerateResponse]:
        raise _missing("RouterService.Generate", "routing to inference (authentication, budgets, streaming)")
        yield  # pragma: no cover - makes this an async generator

    async def Complete(self, request: pb2.CompleteRequest, context: grpc.aio.ServicerContext) -> pb2.CompleteResponse:
        raise _missing("RouterService.Complete", "routing to inference")

    async def RunTask(self, request: pb2.RunTaskRequest, context: grpc.aio.ServicerContext) -> pb2.RunTaskResponse:
        raise _missing("RouterService.RunTask", "declarative task templates")

    async def CountTokens(
        self, request: pb2.CountTokensRequest, context: grpc.aio.ServicerContext
    ) -> pb2.CountTokensResponse:
        raise _missing("RouterService.CountTokens", "the model registry")

    async def ListModels(
        self, request: pb2.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> pb2.ListModelsResponse:
        raise _missing("RouterService.ListModels", "the model registry")

    async def SubmitBatch(
        self, request: pb2.SubmitBatchRequest, context: grpc.aio.ServicerContext
    ) -> pb2.SubmitBatchResponse:
        raise _missing("RouterService.SubmitBatch", "the batch job queue")

    async def GetJob(self, request: pb2.GetJobRequest, context: grpc.aio.ServicerContext) -> pb2.GetJobResponse:
        raise _missing("RouterService.GetJob", "the batch job queue")

    async def ListJobs(self, request: pb2.ListJobsRequest, context: grpc.aio.ServicerContext) -> pb2.ListJobsResponse:
        raise _missing("RouterService.ListJobs", "the batch job queue")

    async def CancelJob(
        self, request: pb2.CancelJobRequest, context: grpc.aio.ServicerContext
    ) -> pb2.CancelJobResponse:
        raise _missing("RouterService.CancelJob", "the batch job queue")


class AdminServicer(admin_grpc.AdminServiceServicer):
    async def CreateApiKey(
        self, request: admin_pb2.CreateApiKeyRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.CreateApiKeyResponse:
        raise _missing("AdminService.CreateApiKey", "the API key store")

    async def ListApiKeys(
        self, request: admin_pb2.ListApiKeysRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.ListApiKeysResponse:
        raise _missing("AdminService.ListApiKeys", "the API key store")

    async def RevokeApiKey(
        self, request: admin_pb2.RevokeApiKeyRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.RevokeApiKeyResponse:
        raise _missing("AdminService.RevokeApiKey", "the API key store")

    async def RegisterModelVersion(
        self, request: admin_pb2.RegisterModelVersionRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.RegisterModelVersionResponse:
        raise _missing("AdminService.RegisterModelVersion", "the model registry")

    async def SetTrafficSplit(
        self, request: admin_pb2.SetTrafficSplitRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.SetTrafficSplitResponse:
        raise _missing("AdminService.SetTrafficSplit", "the model registry")

    async def PromoteVersion(
        self, request: admin_pb2.PromoteVersionRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.PromoteVersionResponse:
        raise _missing("AdminService.PromoteVersion", "the model registry")

    async def RollbackVersion(
        self, request: admin_pb2.RollbackVersionRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.RollbackVersionResponse:
        raise _missing("AdminService.RollbackVersion", "the model registry")

    async def GetModel(
        self, request: admin_pb2.GetModelRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.GetModelResponse:
        raise _missing("AdminService.GetModel", "the model registry")

    async def SetPolicy(
        self, request: admin_pb2.SetPolicyRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.SetPolicyResponse:
        raise _missing("AdminService.SetPolicy", "the policy engine")

    async def GetPolicy(
        self, request: admin_pb2.GetPolicyRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.GetPolicyResponse:
        raise _missing("AdminService.GetPolicy", "the policy engine")
