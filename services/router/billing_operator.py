"""Billing's operator RPCs as the console uses them: usage reports, budgets (list, create, update, delete)
and billing's audit log, called with billing's operator token (`router.billing_operator_token`, its file,
else `<mesh.data_dir>/billing_operator_token`, read at each call so a token billing makes later is found).

Answers are plain JSON-ready dicts (proto field names); billing's own messages for bad input pass on
through the one peer-error table."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar, cast

import grpc
from google.protobuf.json_format import MessageToDict
from google.protobuf.message import Message

from autoglm.billing.v1 import billing_service_pb2 as pb2
from autoglm.billing.v1 import billing_service_pb2_grpc as pb2_grpc
from services.cli.billing_commands import DIMENSIONS, GRANULARITIES, budget_message
from services.common.errors import FailedPrecondition
from services.common.peer_errors import billing_error
from services.common.tracing import outgoing_metadata
from services.router.billing_client import RECONNECT_OPTIONS

T = TypeVar("T")


def as_dict(message: Message) -> dict[str, Any]:
    return MessageToDict(message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)


class BillingOperator:
    def __init__(self, target: str, token: str = "", token_file: Path | None = None, timeout_s: float = 10.0) -> None:
        self._channel = grpc.aio.insecure_channel(target, options=RECONNECT_OPTIONS)
        self._stub = pb2_grpc.BillingServiceStub(self._channel)
        self._token = token
        self._token_file = token_file
        self._timeout_s = timeout_s

    def _metadata(self) -> tuple[tuple[str, str], ...]:
        token = self._token
        if not token and self._token_file is not None:
            try:
                token = self._token_file.read_text().strip()
            except OSError:
                token = ""
        if not token:
            raise FailedPrecondition("the router has no billing operator token: set router.billing_operator_token_file "
                                     "(or start billing, which makes <mesh.data_dir>/billing_operator_token)")
        return (*outgoing_metadata(), ("authorization", f"Bearer {token}"))

    async def _call(self, rpc: Callable[..., Awaitable[T]], request: Message) -> T:
        try:
            return await rpc(request, metadata=self._metadata(), timeout=self._timeout_s)
        except grpc.aio.AioRpcError as exc:
            raise billing_error(exc) from None

    async def usage_report(self, start_us: int, end_us: int, group_by: list[str], granularity: str = "none",
                           tag_key: str = "", top_n: int = 0) -> dict[str, Any]:
        request = pb2.GetUsageReportRequest(group_by=cast(Any, [DIMENSIONS[d] for d in group_by]), tag_key=tag_key,
                                            granularity=cast(Any, GRANULARITIES[granularity]), top_n=top_n)
        request.start_time.FromMicroseconds(start_us)
        request.end_time.FromMicroseconds(end_us)
        return as_dict(await self._call(self._stub.GetUsageReport, request))

    async def list_budgets(self) -> list[dict[str, Any]]:
        reply = await self._call(self._stub.ListBudgets, pb2.ListBudgetsRequest())
        return [as_dict(status) for status in reply.budgets]

    async def save_budget(self, fields: dict[str, Any], actor: str, update: bool) -> dict[str, Any]:
        """Create (or, with `update`, change) the budget `autoglm budget set` would for these fields."""
        budget = budget_message(**fields)
        if update:
            reply = await self._call(self._stub.UpdateBudget, pb2.UpdateBudgetRequest(budget=budget, actor=actor))
        else:
            reply = await self._call(self._stub.CreateBudget, pb2.CreateBudgetRequest(budget=budget, actor=actor))
        return as_dict(reply.budget)

    async def delete_budget(self, budget_id: str, actor: str) -> None:
        await self._call(self._stub.DeleteBudget, pb2.DeleteBudgetRequest(budget_id=budget_id, actor=actor))

    async def audit_page(self, action: str, page_size: int, page_token: str) -> tuple[list[dict[str, Any]], str]:
        reply = await self._call(self._stub.ListAuditEvents, pb2.ListAuditEventsRequest(
            action=action, page_size=page_size, page_token=page_token))
        return [as_dict(e) for e in reply.events], reply.next_page_token

    async def close(self) -> None:
        await self._channel.close()
