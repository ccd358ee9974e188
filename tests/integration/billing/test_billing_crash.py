"""Exactly once across a crash: 10,000 sends (30 % duplicates or retries) over 8 concurrent streams and unary
calls; billing is SIGKILLed mid-stream and restarted; clients resend whatever was not acknowledged.
Afterwards every event id is in the ledger once and the totals match to the micro-unit."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
from pathlib import Path

import grpc
import pytest

from autoglm.billing.v1 import billing_service_pb2 as pb2
from autoglm.billing.v1 import billing_service_pb2_grpc as pb2_grpc
from tests.integration.billing.helpers import expected_cost, operator, price_request, usage
from tests.integration.billing.procs import operator_token, start_billing, wait_port

UNIQUE, DUPLICATES, STREAMS = 7_000, 3_000, 8


class Acks:
    """Acknowledgements received so far; `reached` is set once `threshold` of them arrived."""

    def __init__(self, threshold: int) -> None:
        self.count = 0
        self.threshold = threshold
        self.reached = asyncio.Event()

    def add(self) -> None:
        self.count += 1
        if self.count >= self.threshold:
            self.reached.set()


class Cluster:
    """One billing process that the test kills and restarts; lanes wait for the current address."""

    def __init__(self, database: str, workdir: Path, processes: list) -> None:
        self.database, self.workdir, self.processes = database, workdir, processes
        self.address = ""
        self.ready = asyncio.Event()
        self.proc: subprocess.Popen[bytes] | None = None

    async def start(self, name: str) -> None:
        proc, port_file = start_billing(self.database, self.workdir, name)
        self.processes.append(proc)
        self.proc = proc
        self.address = await asyncio.to_thread(wait_port, proc, port_file)
        self.ready.set()

    def kill(self) -> None:
        self.ready.clear()
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()


def _requests(pending: list[pb2.UsageEvent], batch: int) -> list[pb2.StreamUsageRequest]:
    if batch == 1:
        return [pb2.StreamUsageRequest(event=e) for e in pending]
    return [pb2.StreamUsageRequest(events=pending[i:i + batch]) for i in range(0, len(pending), batch)]


async def _stream_lane(cluster: Cluster, todo: list[pb2.UsageEvent], acked: Acks, batch: int) -> None:
    """Sends one event per message (batch 1) or client-side batches of `batch` events per message."""
    pending = list(todo)
    while pending:
        await cluster.ready.wait()
        async with grpc.aio.insecure_channel(cluster.address) as chan:
            call = pb2_grpc.BillingServiceStub(chan).StreamUsage(iter(_requests(pending, batch)))
            done: set[str] = set()
            try:
                async for reply in call:
                    for ack in reply.acks or [reply]:
                        assert not ack.error_code, ack.error_message
                        done.add(ack.event_id)
                        acked.add()
            except grpc.aio.AioRpcError as err:
                assert err.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED, grpc.StatusCode.UNKNOWN,
                                      grpc.StatusCode.INTERNAL), err
        # a send may repeat an id within a lane; an ack covers the first of them only
        remaining = []
        for event in pending:
            if event.event_id in done:
                done.discard(event.event_id)
            else:
                remaining.append(event)
        pending = remaining


async def _unary_lane(cluster: Cluster, todo: list[pb2.UsageEvent], acked: Acks) -> None:
    for event in todo:
        while True:
            await cluster.ready.wait()
            try:
                async with grpc.aio.insecure_channel(cluster.address) as chan:
                    await pb2_grpc.BillingServiceStub(chan).RecordUsage(pb2.RecordUsageRequest(event=event), timeout=30)
                acked.add()
                break
            except grpc.aio.AioRpcError as err:
                assert err.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED), err


@pytest.mark.timeout(300)
async def test_sigkill_mid_stream_loses_nothing_and_counts_nothing_twice(database: str, tmp_path: Path,
                                                                         processes) -> None:
    rng = random.Random(4)
    events = [usage(f"ev-{i}", prompt=rng.randint(0, 5000), completion=rng.randint(0, 3000),
                    status=rng.choice([pb2.USAGE_STATUS_COMPLETED, pb2.USAGE_STATUS_CANCELLED]))
              for i in range(UNIQUE)]
    sends = events + [rng.choice(events) for _ in range(DUPLICATES)]
    rng.shuffle(sends)
    unary = sends[: len(sends) // 10]
    lanes = [sends[len(unary) + i :: STREAMS] for i in range(STREAMS)]

    cluster = Cluster(database, tmp_path, processes)
    await cluster.start("first")
    async with operator(cluster.address, operator_token(tmp_path)) as chan:
        await pb2_grpc.BillingServiceStub(chan).CreatePrice(price_request())
    acked = Acks(3_000)
    work = [asyncio.create_task(_stream_lane(cluster, lane, acked, 1 if n % 2 else 25)) for n, lane in enumerate(lanes)]
    work.append(asyncio.create_task(_unary_lane(cluster, unary, acked)))
    await asyncio.wait_for(acked.reached.wait(), 120)  # the kill lands mid-traffic, not after a hang
    cluster.kill()
    killed_at = acked.count
    await cluster.start("second")
    await asyncio.wait_for(asyncio.gather(*work), 240)

    async with operator(cluster.address, operator_token(tmp_path)) as chan:
        stub = pb2_grpc.BillingServiceStub(chan)
        report = await stub.GetUsageReport(pb2.GetUsageReportRequest(
            start_time={"seconds": 0}, end_time={"seconds": 4_000_000_000}))
        per_status = await stub.GetUsageReport(pb2.GetUsageReportRequest(
            start_time={"seconds": 0}, end_time={"seconds": 4_000_000_000}, group_by=[pb2.REPORT_DIMENSION_STATUS]))
        again = [await stub.RecordUsage(pb2.RecordUsageRequest(event=e)) for e in rng.sample(events, 20)]
    assert 3_000 <= killed_at < len(sends)
    assert report.total.requests == UNIQUE
    assert report.total.prompt_tokens == sum(e.prompt_tokens for e in events)
    assert report.total.completion_tokens == sum(e.completion_tokens for e in events)
    assert report.total.cost.micros == sum(expected_cost(e.prompt_tokens, e.completion_tokens) for e in events)
    assert {r.group["status"]: r.requests for r in per_status.rows} == {
        name: sum(1 for e in events if e.status == code)
        for name, code in (("completed", pb2.USAGE_STATUS_COMPLETED), ("cancelled", pb2.USAGE_STATUS_CANCELLED))}
    assert all(a.duplicate for a in again)
