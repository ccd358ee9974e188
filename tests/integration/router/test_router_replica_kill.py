"""SIGKILL one of two inference replicas (real processes) with 50 streams in flight: streams that had
received no token finish on the other replica; the others end with UNAVAILABLE and are billed for the
tokens they received; billing holds exactly one event per request.

Each stream is judged by what its client finally received and what billing recorded, never by a
snapshot taken at the kill: a token the router had already sent may still be on the wire then, and
that stream is (rightly) not retried."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc

from autoglm.common.v1 import generation_pb2
from autoglm.router.v1 import router_service_pb2 as pb2
from services.router.config import RouterConfig
from services.router.server import build_server as build_router
from tests.integration.router.conftest import ADMIN_TOKEN, EPHEMERAL, MODEL, Mesh, start_mesh
from tests.integration.router.service_process import drain, start_service, stop
from tests.integration.router.test_router_vertical import bearer, usage_rows
from tests.settlement import settled_usage

STREAMS = 50


class Stream:
    def __init__(self) -> None:
        self.tokens = 0
        self.error: grpc.StatusCode | None = None
        self.completed = False
        self.billed_tokens: int | None = None  # what the summary says was billed


async def test_killing_a_replica_mid_stream_retries_unstarted_streams_and_bills_the_rest(
    serve, tmp_path: Path, loaded_model
) -> None:
    processes: list = []
    try:
        replicas = []
        for name in ("r1", "r2"):
            proc, address = start_service("inference", ["--replica-id", name, "--threads", "1"], processes)
            drain(proc)
            replicas.append((proc, address))
        mesh = await start_mesh(serve, tmp_path, loaded_model)
        # Route through a router that knows both replicas (the fixture's own replica is left out).
        router = await serve(build_router(RouterConfig(
            server=EPHEMERAL, inference_targets=tuple(a for _, a in replicas), billing_target=mesh.billing.address,
            data_dir=tmp_path / "router2", admin_token=ADMIN_TOKEN)))
        channel = grpc.aio.insecure_channel(router.address)
        routed = Mesh(mesh.billing, mesh.inference, router, channel, mesh.billing_channel, tmp_path / "router2")
        secret, _ = await routed.create_key("crash")
        streams = [Stream() for _ in range(STREAMS)]
        started = asyncio.Event()

        async def run(i: int, stream: Stream) -> None:
            call = routed.router_stub.Generate(pb2.GenerateRequest(
                model=MODEL, prompt=f"Tell a story about the number {i}.", cache_policy=pb2.CACHE_POLICY_BYPASS,
                sampling=generation_pb2.SamplingParams(temperature=0.0, max_tokens=24)),
                metadata=bearer(secret), timeout=120)
            try:
                async for reply in call:
                    stream.tokens += reply.delta_tokens
                    if sum(1 for s in streams if s.tokens) >= 10:
                        started.set()
                    if reply.HasField("summary"):
                        stream.completed = True
                        stream.billed_tokens = reply.summary.usage.completion_tokens
            except grpc.aio.AioRpcError as exc:
                stream.error = exc.code()

        tasks = [asyncio.ensure_future(run(i, s)) for i, s in enumerate(streams)]
        await asyncio.wait_for(started.wait(), 120)
        victim, _ = replicas[0]
        victim.kill()  # SIGKILL: no goodbye to anyone
        victim.wait()
        await asyncio.gather(*tasks)

        failed = [s for s in streams if s.error is not None]
        completed = [s for s in streams if s.completed]
        assert {s.error for s in failed} <= {grpc.StatusCode.UNAVAILABLE}
        assert len(failed) + len(completed) == STREAMS  # every stream either finished or failed, none both
        # A stream fails only after tokens reached its client; one that had none finished elsewhere.
        assert all(s.tokens > 0 for s in failed), [s.tokens for s in failed]
        assert failed, "the kill should catch some streams mid-generation"
        assert all(s.billed_tokens == s.tokens for s in completed)

        report = await settled_usage(lambda: usage_rows(routed, "crash"), lambda r: r.total.requests, STREAMS,
                                     "one usage event per stream", routers=[routed.data_dir])
        assert report.total.requests == STREAMS  # exactly one event per request, none lost, none doubled
        by_status = {row.group["status"].lower(): row for row in report.rows}
        assert by_status["failed"].requests == len(failed)
        assert by_status["failed"].completion_tokens == sum(s.tokens for s in failed)
        assert by_status["completed"].requests == len(completed)
        assert by_status["completed"].completion_tokens == sum(s.tokens for s in completed)
        await channel.close()
        await mesh.channel.close()
        await mesh.billing_channel.close()
    finally:
        stop(processes)

