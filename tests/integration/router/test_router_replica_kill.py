"""SIGKILL one of two inference replicas (real processes) with 50 streams in flight: streams that had
received no token finish on the other replica; the others end with UNAVAILABLE and are billed for the
tokens they received; billing holds exactly one event per request."""

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

STREAMS = 50


class Stream:
    def __init__(self) -> None:
        self.tokens = 0
        self.error: grpc.StatusCode | None = None
        self.completed = False


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
            except grpc.aio.AioRpcError as exc:
                stream.error = exc.code()

        tasks = [asyncio.ensure_future(run(i, s)) for i, s in enumerate(streams)]
        await asyncio.wait_for(started.wait(), 120)
        victim, _ = replicas[0]
        victim.kill()  # SIGKILL: no goodbye to anyone
        victim.wait()
        tokens_at_kill = [s.tokens for s in streams]
        await asyncio.gather(*tasks)

        failed = [s for s in streams if s.error is not None]
        assert {s.error for s in failed} <= {grpc.StatusCode.UNAVAILABLE}
        assert all(s.completed for s, before in zip(streams, tokens_at_kill, strict=True) if before == 0)
        assert all(s.tokens > 0 for s in failed)  # only streams that had sent tokens fail
        assert failed, "the kill should catch some streams mid-generation"

        for _ in range(200):
            report = await usage_rows(routed, "crash")
            if report.total.requests >= STREAMS:
                break
            await asyncio.sleep(0.05)
        assert report.total.requests == STREAMS  # exactly one event per request, none lost
        by_status = {row.group["status"].lower(): row for row in report.rows}
        assert by_status["failed"].requests == len(failed)
        assert by_status["failed"].completion_tokens == sum(s.tokens for s in failed)
        await channel.close()
        await mesh.channel.close()
        await mesh.billing_channel.close()
    finally:
        stop(processes)

