"""gRPC servicer of billing: thin conversions around the ledger."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from autoglm.billing.v1 import billing_service_pb2 as pb2
from autoglm.billing.v1 import billing_service_pb2_grpc as pb2_grpc
from services.common.errors import NotImplementedYet


def _missing(rpc: str, what: str) -> NotImplementedYet:
    return NotImplementedYet(f"{rpc} is not available in this build: {what} is not implemented yet")


class BillingServicer(pb2_grpc.BillingServiceServicer):
    async def RecordUsage(self, request: pb2.RecordUsageRequest, context: grpc.aio.ServicerContext) -> pb2.RecordUsageResponse:
        raise _missing("BillingService.RecordUsage", "the usage ledger")

    async def StreamUsage(self, request_iterator: AsyncIterator[pb2.StreamUsageRequest], context: grpc.aio.ServicerContext) -> AsyncIterator[pb2.StreamUsageResponse]:
        raise _missing("BillingService.StreamUsage", "the usage ledger")
        yield  # pragma: no cover

    async def Reserve(self, request: pb2.ReserveRequest, context: grpc.aio.ServicerContext) -> pb2.ReserveResponse:
        raise _missing("BillingService.Reserve", "budget holds")

    async def Settle(self, request: pb2.SettleRequest, context: grpc.aio.ServicerContext) -> pb2.SettleResponse:
        raise _missing("BillingService.Settle", "budget holds")

    async def Release(self, request: pb2.ReleaseRequest, context: grpc.aio.ServicerContext) -> pb2.ReleaseResponse:
        raise _missing("BillingService.Release", "budget holds")

    async def CheckBudget(self, request: pb2.CheckBudgetRequest, context: grpc.aio.ServicerContext) -> pb2.CheckBudgetResponse:
        raise _missing("BillingService.CheckBudget", "budgets")

    async def CreateBudget(self, request: pb2.CreateBudgetRequest, context: grpc.aio.ServicerContext) -> pb2.CreateBudgetResponse:
        raise _missing("BillingService.CreateBudget", "budgets")

    async def GetBudget(self, request: pb2.GetBudgetRequest, context: grpc.aio.ServicerContext) -> pb2.GetBudgetResponse:
        raise _missing("BillingService.GetBudget", "budgets")

    async def ListBudgets(self, request: pb2.ListBudgetsRequest, context: grpc.aio.ServicerContext) -> pb2.ListBudgetsResponse:
        raise _missing("BillingService.ListBudgets", "budgets")

    async def UpdateBudget(self, request: pb2.UpdateBudgetRequest, context: grpc.aio.ServicerContext) -> pb2.UpdateBudgetResponse:
        raise _missing("BillingService.UpdateBudget", "budgets")

    async def DeleteBudget(self, request: pb2.DeleteBudgetRequest, context: grpc.aio.ServicerContext) -> pb2.DeleteBudgetResponse:
        raise _missing("BillingService.DeleteBudget", "budgets")

    async def CreatePrice(self, request: pb2.CreatePriceRequest, context: grpc.aio.ServicerContext) -> pb2.CreatePriceResponse:
        raise _missing("BillingService.CreatePrice", "the price table")

    async def ListPrices(self, request: pb2.ListPricesRequest, context: grpc.aio.ServicerContext) -> pb2.ListPricesResponse:
        raise _missing("BillingService.ListPrices", "the price table")

    async def DeletePrice(self, request: pb2.DeletePriceRequest, context: grpc.aio.ServicerContext) -> pb2.DeletePriceResponse:
        raise _missing("BillingService.DeletePrice", "the price table")

    async def WatchAlerts(self, request: pb2.WatchAlertsRequest, context: grpc.aio.ServicerContext) -> AsyncIterator[pb2.WatchAlertsResponse]:
        raise _missing("BillingService.WatchAlerts", "budget alerts")
        yield  # pragma: no cover

    async def GetUsageReport(self, request: pb2.GetUsageReportRequest, context: grpc.aio.ServicerContext) -> pb2.GetUsageReportResponse:
        raise _missing("BillingService.GetUsageReport", "usage reports")

    async def ListAuditEvents(self, request: pb2.ListAuditEventsRequest, context: grpc.aio.ServicerContext) -> pb2.ListAuditEventsResponse:
        raise _missing("BillingService.ListAuditEvents", "the audit log")
