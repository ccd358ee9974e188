"""Builds the billing service's gRPC server over its store."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence

import grpc

from autoglm.billing.v1 import billing_service_pb2, billing_service_pb2_grpc
from services.billing.config import BillingConfig
from services.billing.operators import OperatorAuth
from services.billing.service import (
    Billing,
    Clock,
    run_engine_reconciler,
    run_hold_janitor,
    run_rollup_roller,
    wall_clock,
)
from services.billing.servicer import BillingServicer
from services.billing.store import open_store
from services.common.grpc_server import RunningServer, start_server


async def build_server(config: BillingConfig, clock: Clock = wall_clock) -> RunningServer:
    operators = OperatorAuth(config.operator_token_value(),
                             frozenset(config.operator_identities), config.trust_forwarded_identity)
    store = open_store(config.dsn, sqlite_synchronous=config.sqlite_synchronous,
                       pool_size=config.postgres_pool_size, max_batch=config.max_batch)
    await store.open()
    billing = Billing(store, config, clock)

    def register(server: grpc.aio.Server) -> Sequence[str]:
        billing_service_pb2_grpc.add_BillingServiceServicer_to_server(BillingServicer(billing, operators), server)
        return [billing_service_pb2.DESCRIPTOR.services_by_name["BillingService"].full_name]

    try:
        running = await start_server("billing", register, host=config.server.host, port=config.server.port)
    except BaseException:
        await store.close()
        raise
    janitor = asyncio.create_task(run_hold_janitor(billing))
    reconciler = asyncio.create_task(run_engine_reconciler(billing))
    roller = asyncio.create_task(run_rollup_roller(billing))

    async def shutdown() -> None:
        for task in (janitor, reconciler, roller):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await billing.close()

    running.on_stop.append(shutdown)
    return running
