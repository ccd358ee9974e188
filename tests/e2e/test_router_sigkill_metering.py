"""Engine-side metering against the whole mesh `autoglm up` starts (sidecars, mTLS, the real model):
SIGKILL the router with 30 streams in flight; the launcher restarts it (Python sidecars and Envoy). Expected: every one of the 30
requests ends with exactly one usage event — the router's for the streams it finished (journaled or
settled), and for the interrupted ones, whose router died before it could send anything, the event billed
from the replica's record, with the replica's token counts (source "engine" in the ledger). Nothing is
counted twice: the tenant holds exactly the events of the requests it made. With router leases on a hard
budget, the dead router's lease holds the records until it expired, then the grace."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import subprocess
import uuid
from collections import Counter
from contextlib import closing
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from autoglm.router.v1 import router_service_pb2_grpc
from tests.conftest import tool
from tests.e2e.mesh_client import StreamOutcome, create_key, generate_request, router_channel
from tests.e2e.mesh_process import Mesh, start_mesh, stop_mesh
from tests.settlement import settled_usage
from tests.waiting import wait_until

pytestmark = pytest.mark.slow

STREAMS = 30
TENANT = "drill-router-kill"
ENGINE_SOURCE = 2


def router_pid(mesh: Mesh) -> int | None:
    for pid in mesh.descendants():
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except FileNotFoundError:
            continue
        if b"services.router" in cmdline:
            return pid
    return None


def ledger(mesh: Mesh, request_ids: list[str]) -> dict[str, list[tuple[int, int, int]]]:
    """(prompt tokens, completion tokens, source) of each ledger event of these ids, read from billing's
    SQLite ledger (read-only), and the tenant's events of other ids under ''."""
    found: dict[str, list[tuple[int, int, int]]] = {}
    wanted = set(request_ids)
    path = mesh.data_dir / "billing.sqlite3"
    with closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)) as conn:
        for event_id, prompt, completion, source in conn.execute(
                "SELECT event_id, prompt_tokens, completion_tokens, source FROM events WHERE tenant_id = ?", (TENANT,)):
            found.setdefault(event_id if event_id in wanted else "", []).append((prompt, completion, source))
    return found


def engine_counts(mesh: Mesh, request_id: str) -> list[tuple[int, int, int, str, int]]:
    """(prompt tokens, completion tokens, state, router id, due - arrival in µs) of the replicas' records
    of one request."""
    path = mesh.data_dir / "billing.sqlite3"
    with closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)) as conn:
        return list(conn.execute("SELECT prompt_tokens, completion_tokens, state, router_id, due_us - received_us"
                                 " FROM engine_records WHERE request_id = ?", (request_id,)))


async def one_stream(stub: router_service_pb2_grpc.RouterServiceStub, key: str, request_id: str, i: int,
                     received: Counter[str], started: asyncio.Event) -> StreamOutcome:
    outcome = StreamOutcome()
    max_tokens = 6 if i % 5 == 0 else 64  # a few finish before the kill, most are cut off by it
    request = generate_request(f"Count slowly from {i} upward, one number a line.", max_tokens, seed=i)
    try:
        async for message in stub.Generate(request, timeout=180, metadata=(
                ("authorization", f"Bearer {key}"), ("x-request-id", request_id))):
            outcome.tokens += message.delta_tokens
            if message.HasField("summary"):
                outcome.summary_completion_tokens = message.summary.usage.completion_tokens
            if message.delta_tokens:
                received[request_id] += message.delta_tokens
            _kill_time(received, started)
    except grpc.aio.AioRpcError as error:
        outcome.code = error.code()
    else:
        received["ok"] += 1
        _kill_time(received, started)
    return outcome


def _kill_time(received: Counter[str], started: asyncio.Event) -> None:
    """Some streams completed and many more are mid-way: the moment to kill the router."""
    if received["ok"] >= 3 and sum(1 for k, n in received.items() if n and k != "ok") >= 12:
        started.set()


GRACE_S = 20
# With router.billing_leases and a hard budget: the dead router's lease (LEASE_TTL_S) holds its
# requests' records before the grace starts.
LEASE_CONFIG = {"router": {"billing_leases": True},
                "billing": {"engine_grace_s": 5, "lease_ttl_s": 15, "lease_refresh_s": 3}}


@pytest.mark.parametrize("sidecar, leases", [("python", False), ("envoy", False), ("python", True)])
async def test_sigkill_router_with_30_streams_each_request_has_exactly_one_usage_event(tmp_path, processes,
                                                                                     sidecar: str,
                                                                                     leases: bool) -> None:
    # The per-request path (Reserve and Settle) is asked for explicitly: leases are on by default.
    config = LEASE_CONFIG if leases else {"router": {"billing_leases": False}, "billing": {"engine_grace_s": GRACE_S}}
    mesh = start_mesh(tmp_path, processes, extra_args=("--sidecar", sidecar), extra_config=config)
    key = await create_key(mesh, TENANT)
    if leases:
        made = await asyncio.to_thread(
            subprocess.run, [tool("autoglm"), "budget", "set", "--data-dir", str(mesh.data_dir), "--tenant", TENANT,
                             "--amount", "100", "--period", "monthly"], capture_output=True, text=True, timeout=60)
        assert made.returncode == 0, made.stderr
    first = router_pid(mesh)
    assert first is not None
    ids = [f"rk-{i}-{uuid.uuid4().hex[:12]}" for i in range(STREAMS)]
    received: Counter[str] = Counter()
    started = asyncio.Event()
    async with router_channel(mesh) as channel:
        stub = router_service_pb2_grpc.RouterServiceStub(channel)
        tasks = [asyncio.create_task(one_stream(stub, key, ids[i], i, received, started)) for i in range(STREAMS)]
        await asyncio.wait_for(started.wait(), 180)
        os.kill(first, signal.SIGKILL)
        outcomes = dict(zip(ids, await asyncio.gather(*tasks), strict=True))
    await wait_until(lambda: (pid := router_pid(mesh)) is not None and pid != first, 120,
                     "the launcher to restart the router")
    async with router_channel(mesh) as channel:  # the restarted router serves (and replayed its journal)
        health = health_pb2_grpc.HealthStub(channel)
        await wait_until(lambda: _serving(health), 120, "the restarted router to report SERVING", interval=0.25)
        after = f"rk-after-{uuid.uuid4().hex[:12]}"
        outcomes[after] = await one_stream(router_service_pb2_grpc.RouterServiceStub(channel), key, after, 0,
                                           Counter(), asyncio.Event())
    assert outcomes[after].code == grpc.StatusCode.OK
    ids.append(after)

    codes = Counter(o.code for o in outcomes.values())
    interrupted = [i for i, o in outcomes.items() if o.code != grpc.StatusCode.OK]
    broken = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED}
    if sidecar == "envoy":  # Envoy ends a stream whose upstream was reset mid-way with INTERNAL
        broken.add(grpc.StatusCode.INTERNAL)
    assert set(codes) <= {grpc.StatusCode.OK, *broken}, codes
    assert interrupted, "the kill interrupted no stream"
    events = await settled_usage(lambda: asyncio.to_thread(ledger, mesh, ids),
                                 lambda found: sum(len(v) for k, v in found.items() if k), len(ids),
                                 f"{len(ids)} usage events for {TENANT}", routers=[mesh.data_dir / "router"],
                                 timeout_s=120, interval_s=0.25)
    assert "" not in events, f"events of requests nobody made: {events['']}"
    assert {request_id: len(events.get(request_id, [])) for request_id in ids} == dict.fromkeys(ids, 1)
    by_engine = 0
    for request_id, outcome in outcomes.items():
        (prompt, completion, source), = events[request_id]
        if source == ENGINE_SOURCE:  # the router died before its event: the replica's counts
            by_engine += 1
            assert outcome.code != grpc.StatusCode.OK, request_id
            billed = [row for row in engine_counts(mesh, request_id) if row[2] == 2]
            assert [(p, c) for p, c, _, _, _ in billed] == [(prompt, completion)], (request_id, billed)
            (_, _, _, router_id, wait_us), = billed
            grace_us = config["billing"]["engine_grace_s"] * 1_000_000
            assert router_id.startswith("router-") and wait_us >= grace_us  # the dead router's id, its grace
            if leases:  # held until the dead router's lease expired, then the grace
                assert wait_us > grace_us, (request_id, wait_us)
            assert completion >= outcome.tokens  # at least what reached the client
        elif outcome.code == grpc.StatusCode.OK:
            assert completion == outcome.tokens == outcome.summary_completion_tokens, request_id
    assert by_engine >= 1, "no interrupted request was billed from the replica's record"
    report = await asyncio.to_thread(
        subprocess.run, [tool("autoglm"), "usage", "--data-dir", str(mesh.data_dir), "--tenant", TENANT, "--by",
                         "source", "--format", "json"], capture_output=True, text=True, timeout=60)
    assert report.returncode == 0, report.stderr
    assert {row["source"]: row["requests"] for row in json.loads(report.stdout)["rows"]} == \
        {"engine": by_engine, "router": len(ids) - by_engine}
    print(f"\n{STREAMS} streams: {codes[grpc.StatusCode.OK] - 1} finished, {len(interrupted)} interrupted, "
          f"{by_engine} billed from replicas' records")
    assert stop_mesh(mesh) == 0


async def _serving(health: health_pb2_grpc.HealthStub) -> bool:
    try:
        reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=5)
    except grpc.aio.AioRpcError:
        return False
    return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)
