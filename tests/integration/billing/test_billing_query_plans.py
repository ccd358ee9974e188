"""The per-request path (Reserve, Settle, Release, a repeated Reserve) reads and changes rows only through
indexes: SQLite's plan of every statement it runs, with its own parameters bound, searches instead of
scanning a table — a scan costs CPU in proportion to every hold and event ever recorded."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

from autoglm.billing.v1 import billing_service_pb2 as pb2
from autoglm.billing.v1 import billing_service_pb2_grpc as pb2_grpc
from services.billing.config import BillingConfig
from services.billing.server import build_server
from services.billing.store.sqlite_store import SqliteTx
from services.common.config import ServerSettings
from tests.integration.billing.helpers import OPERATOR_TOKEN, operator, price_request, tenant_budget, usage


def _recording(method: Callable[..., Any], seen: list[tuple[str, tuple[Any, ...]]]) -> Callable[..., Any]:
    def record(self: SqliteTx, sql: str, params: Sequence[Any] = ()) -> Any:
        seen.append((sql, tuple(params)))
        return method(self, sql, params)

    return record


async def test_reserve_settle_and_release_never_scan_a_table(serve, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "billing.sqlite3"
    running = await serve(build_server(BillingConfig(server=ServerSettings(port=0), database=f"sqlite:///{path}",
                                                     operator_token=OPERATOR_TOKEN)))
    async with operator(running) as chan:
        stub = pb2_grpc.BillingServiceStub(chan)
        await stub.CreatePrice(price_request())
        await stub.CreateBudget(tenant_budget("acme", micros=10**12))
        seen: list[tuple[str, tuple[Any, ...]]] = []
        for name in ("one", "all", "execute"):
            monkeypatch.setattr(SqliteTx, name, _recording(getattr(SqliteTx, name), seen))
        for n in range(3):
            request = pb2.ReserveRequest(tenant_id="acme", api_key_id="k1", model="smollm2", max_prompt_tokens=100,
                                         max_completion_tokens=100, request_id=f"r{n}")
            hold = await stub.Reserve(request)
            assert (await stub.Reserve(request)).hold_id == hold.hold_id  # idempotent by request id
            if n % 2:
                assert (await stub.Release(pb2.ReleaseRequest(hold_id=hold.hold_id))).released
            else:
                await stub.Settle(pb2.SettleRequest(hold_id=hold.hold_id, event=usage(f"e{n}", request_id=f"r{n}")))
    monkeypatch.undo()
    statements = {(sql, params) for sql, params in seen
                  if sql.lstrip().upper().startswith(("SELECT", "UPDATE", "DELETE")) and " WHERE " in sql.upper()}
    assert any("FROM holds" in sql and "request_id" in sql for sql, _ in statements)
    with sqlite3.connect(path) as conn:
        scans = {sql: detail for sql, params in statements
                 for *_, detail in conn.execute(f"EXPLAIN QUERY PLAN {sql}", params) if detail.startswith("SCAN")}
    assert scans == {}
