"""Failure drills against the whole mesh started by `autoglm up` (sidecars, mTLS, the real model).

Each drill states its expected outcome and checks the ledger: every request the router accepted is
billed exactly once (no usage event lost or doubled), with the tokens the client actually received.
Streams are judged by what their clients finally received, never by a snapshot taken at the moment of
a fault (a token already sent may still be on the wire then), and the ledger is read only once
settlement is idle (`tests/settlement.py`), so a duplicate that lands late is seen.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import signal
from collections import Counter
from pathlib import Path

import grpc
import pytest

from autoglm.router.v1 import router_service_pb2_grpc
from sidecar import certs
from tests.e2e.mesh_client import Totals, create_key, generate_request, router_channel, stream, usage_totals
from tests.e2e.mesh_process import Mesh, start_mesh, stop_mesh
from tests.settlement import settled_usage
from tests.waiting import wait_until

pytestmark = pytest.mark.slow


def child_pid(mesh: Mesh, name: str) -> int:
    """PID of the launcher's child `name` (its log file name), found through the process table."""
    for pid in mesh.descendants():
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        if name.startswith("inference-") and not name.endswith("sidecar"):
            if b"services.inference" in cmdline and name.encode() in cmdline:
                return pid
        elif name == "billing" and b"services.billing" in cmdline:
            return pid
        elif name == "inference-sidecar" and b"sidecar" in cmdline and b"inference" in cmdline:
            return pid
    raise LookupError(name)


WAVES = 3  # of 40 never-read streams each in the memory drill


async def settled_totals(mesh: Mesh, tenant: str, expected_requests: int, timeout_s: float = 60) -> Totals:
    """Billing's totals once settlement is idle: at least `expected_requests` events arrived, the
    router's spool and journal are empty, and billing's count stayed put for a settle window."""
    return await settled_usage(lambda: usage_totals(mesh, tenant), lambda t: t.requests, expected_requests,
                               f"{expected_requests} usage events for {tenant}", routers=[mesh.data_dir / "router"],
                               timeout_s=timeout_s, interval_s=0.25)


async def test_sigkill_inference_replica_mid_stream_loses_no_usage(tmp_path, processes) -> None:
    """Expected: streams on the killed replica end (UNAVAILABLE once they had tokens, or finish on the other
    replica if they had none); every request is billed once, for exactly the tokens its client received."""
    mesh = start_mesh(tmp_path, processes, replicas=2)
    key = await create_key(mesh, "drill-kill")
    started = asyncio.Event()
    received = Counter[int]()

    async with router_channel(mesh) as channel:
        stub = router_service_pb2_grpc.RouterServiceStub(channel)

        def on_token() -> None:
            if sum(received.values()) >= 20:
                started.set()

        async def one(i: int):  # type: ignore[no-untyped-def]
            outcome = await stream(stub, key, generate_request(f"Count slowly from {i} upward.", 48, seed=i),
                                   on_token=lambda: (received.update([i]), on_token()))
            return outcome

        tasks = [asyncio.create_task(one(i)) for i in range(20)]
        await asyncio.wait_for(started.wait(), 120)
        os.kill(child_pid(mesh, "inference-0"), signal.SIGKILL)
        outcomes = await asyncio.gather(*tasks)

    codes = Counter(o.code for o in outcomes)
    assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE}, codes
    assert codes[grpc.StatusCode.OK] >= 1
    for outcome in outcomes:
        if outcome.code == grpc.StatusCode.OK:
            assert outcome.summary_completion_tokens == outcome.tokens
        else:  # a stream fails only after tokens reached its client; one without any is retried
            assert outcome.tokens > 0, outcome
    totals = await settled_totals(mesh, "drill-kill", len(outcomes))
    assert totals.requests == len(outcomes)
    assert totals.completion_tokens == sum(o.tokens for o in outcomes)
    assert stop_mesh(mesh) == 0


async def test_billing_stopped_for_30s_interactive_traffic_continues_and_ledger_matches(tmp_path, processes) -> None:
    """Expected: with billing frozen (SIGSTOP) for 30 s, interactive requests keep succeeding on the spool;
    when billing returns the spool replays, and the ledger holds exactly the requests served."""
    mesh = start_mesh(tmp_path, processes)
    key = await create_key(mesh, "drill-billing")
    billing = child_pid(mesh, "billing")
    outcomes = []
    async with router_channel(mesh) as channel:
        stub = router_service_pb2_grpc.RouterServiceStub(channel)
        outcomes.append(await stream(stub, key, generate_request("Name a colour.", 6)))
        os.kill(billing, signal.SIGSTOP)
        try:
            loop = asyncio.get_running_loop()
            frozen_until = loop.time() + 30
            i = 0
            while loop.time() < frozen_until:
                outcomes.append(await stream(stub, key, generate_request(f"Name a fruit, number {i}.", 6, seed=i)))
                i += 1
        finally:
            os.kill(billing, signal.SIGCONT)
        outcomes.append(await stream(stub, key, generate_request("Name an animal.", 6)))

    assert all(o.code == grpc.StatusCode.OK for o in outcomes), Counter(o.code for o in outcomes)
    assert len(outcomes) >= 4

    totals = await settled_totals(mesh, "drill-billing", len(outcomes))  # the spool replayed into billing
    assert totals.requests == len(outcomes)
    assert totals.completion_tokens == sum(o.tokens for o in outcomes)
    assert stop_mesh(mesh) == 0


async def test_expired_service_certificate_fails_calls_cleanly_until_renewed(tmp_path, processes) -> None:
    """Expected: inference's sidecar restarts holding an expired certificate; the router's calls then fail
    with UNAVAILABLE (its mTLS handshake is refused), each failure billed once with no tokens; writing a
    renewed certificate (hot-reloaded, no restart) restores service."""
    mesh = start_mesh(tmp_path, processes)
    key = await create_key(mesh, "drill-cert")
    cert_dir = mesh.data_dir / "certs"
    ca = certs.read_pair(cert_dir, "ca")
    long_ago = dt.datetime.now(dt.UTC) - dt.timedelta(days=30)
    certs.write_pair(cert_dir, "inference", certs.issue(ca, "inference", ttl=dt.timedelta(days=1), now=long_ago))
    os.kill(child_pid(mesh, "inference-sidecar"), signal.SIGKILL)  # the launcher restarts it with the expired cert
    outcomes = []
    async with router_channel(mesh) as channel:
        stub = router_service_pb2_grpc.RouterServiceStub(channel)

        async def refused() -> bool:
            outcome = await stream(stub, key, generate_request("Hello?", 4), timeout=30)
            outcomes.append(outcome)
            return outcome.code == grpc.StatusCode.UNAVAILABLE

        await wait_until(refused, 60, "calls to fail once the expired certificate is in use", interval=0.25)
        certs.issue_to(cert_dir, "inference", ttl=dt.timedelta(days=1))

        async def served() -> bool:
            outcome = await stream(stub, key, generate_request("Hello again?", 4), timeout=30)
            outcomes.append(outcome)
            return outcome.code == grpc.StatusCode.OK

        await wait_until(served, 120, "calls to succeed after the certificate was renewed", interval=0.25)
    assert set(o.code for o in outcomes) <= {grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE}
    failed = [o for o in outcomes if o.code != grpc.StatusCode.OK]
    assert failed and all(o.tokens == 0 for o in failed)
    totals = await settled_totals(mesh, "drill-cert", len(outcomes))
    assert totals.requests == len(outcomes)
    assert totals.completion_tokens == sum(o.tokens for o in outcomes)
    assert stop_mesh(mesh) == 0


async def test_full_inference_queue_answers_resource_exhausted_and_nothing_hangs(tmp_path, processes) -> None:
    """Expected: with a tiny inference queue, surplus requests get RESOURCE_EXHAUSTED quickly (no hang);
    every request is billed once."""
    mesh = start_mesh(tmp_path, processes,
                      extra_config={"inference": {"max_batch_size": 2, "queue_capacity": 2}})
    key = await create_key(mesh, "drill-queue")
    async with router_channel(mesh) as channel:
        stub = router_service_pb2_grpc.RouterServiceStub(channel)
        outcomes = await asyncio.wait_for(asyncio.gather(*(
            stream(stub, key, generate_request(f"Write a long story about ship {i}.", 32, seed=i), timeout=120)
            for i in range(24))), 180)
    codes = Counter(o.code for o in outcomes)
    assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}, codes
    assert codes[grpc.StatusCode.RESOURCE_EXHAUSTED] >= 1 and codes[grpc.StatusCode.OK] >= 1
    totals = await settled_totals(mesh, "drill-queue", len(outcomes))
    assert totals.requests == len(outcomes)
    assert totals.completion_tokens == sum(o.tokens for o in outcomes)
    assert stop_mesh(mesh) == 0


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def test_clients_that_never_read_do_not_grow_memory_without_bound(tmp_path, processes) -> None:
    """Expected: streams whose clients read one message and then never again are held by HTTP/2 flow
    control; generation finishes and is billed once each; a third wave of such clients does not grow any
    process of the mesh past what the first two reached (memory is bounded, not proportional to unread
    streams over time)."""
    mesh = start_mesh(tmp_path, processes)
    key = await create_key(mesh, "drill-slow")
    pids = mesh.descendants()
    peaks: list[dict[int, float]] = []
    async with router_channel(mesh) as channel:
        stub = router_service_pb2_grpc.RouterServiceStub(channel)
        for wave in range(WAVES):
            calls = [stub.Generate(generate_request(f"Tell a very long tale number {i}.", 128, seed=i),
                                   metadata=(("authorization", f"Bearer {key}"),), timeout=300) for i in range(40)]
            for call in calls:  # each client reads one message, then never again
                await call.read()

            async def wave_billed(expected: int = 40 * (wave + 1)) -> bool:
                return (await usage_totals(mesh, "drill-slow")).requests >= expected

            await wait_until(wave_billed, 240, "every unread stream to finish generating and be billed",
                             interval=0.25)
            peaks.append({pid: rss_mib(pid) for pid in pids})
            for call in calls:
                call.cancel()
    # The first waves take each process to its allocators' high-water marks (the inference replica's ONNX
    # Runtime arena grows with the largest batch shapes it has seen, which depends on timing: 499 → 569 MiB
    # between two equal waves in one run). The last wave may move by allocator slack (10 % of the process,
    # at least 48 MiB); growth beyond that is what buffering unread streams would add.
    over = {pid: [round(p[pid]) for p in peaks] for pid in pids
            if peaks[-1][pid] - max(p[pid] for p in peaks[:-1]) >= max(48.0, 0.10 * peaks[-1][pid])}
    assert not over, f"RSS MiB after each wave grew past the earlier waves' high-water mark: {over}"
    totals = await settled_totals(mesh, "drill-slow", 40 * WAVES)
    assert totals.requests == 40 * WAVES
    assert stop_mesh(mesh) == 0
