"""Two real inference replicas behind a real router: every turn of a conversation (`context_id`) goes to
the replica whose prefix cache holds its earlier turns (its WatchLoad counts the hits), a replica loaded
past the affinity margin is passed over for the idle one, and once the load is gone the conversation
returns to its replica and its cached blocks."""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from pathlib import Path

import grpc

from autoglm.common.v1 import generation_pb2
from autoglm.inference.v1 import inference_service_pb2 as inference_pb2
from autoglm.inference.v1 import inference_service_pb2_grpc as inference_grpc
from autoglm.router.v1 import router_service_pb2 as pb2
from services.inference.config import InferenceConfig
from services.inference.server import build_server as build_inference
from services.router.config import RouterConfig
from services.router.server import build_server as build_router
from tests.integration.router.conftest import ADMIN_TOKEN, EPHEMERAL, MODEL, Mesh, start_mesh
from tests.integration.router.test_router_metrics import scrape, value
from tests.integration.router.test_router_vertical import bearer
from tests.waiting import WaitTimeout, wait_until

# Sequences started on one replica behind the router's back (chat turns asking for a long story: each runs
# to its max_tokens); the router must see at least LOADED of them, past the default margin of 4 over the
# idle replica.
LOAD_STREAMS, LOADED = 12, 8


async def report(address: str) -> inference_pb2.WatchLoadResponse:
    async with grpc.aio.insecure_channel(address) as channel:
        call = inference_grpc.InferenceServiceStub(channel).WatchLoad(inference_pb2.WatchLoadRequest(interval_ms=50))
        first = await asyncio.wait_for(call.read(), 30)
        call.cancel()
        return first  # type: ignore[no-any-return]


@dataclass(frozen=True)
class Seen:
    """Whether the router's view of a replica's load is in range; on a timeout its repr says what the
    router showed and what the replica itself reported at the last poll."""

    ok: bool
    router: float
    replica: inference_pb2.WatchLoadResponse

    def __bool__(self) -> bool:
        return self.ok

    def __repr__(self) -> str:
        r = self.replica
        return (f"the router's autoglm_router_replica_load {self.router:g}; the replica's own report: "
                f"{r.queue_depth} queued, {r.active_sequences} active, {r.cancelled_total} cancelled, "
                f"{r.prefill_tokens_total} prompt tokens prefilled")


async def router_sees_load(address: str, at_least: int | None = None, at_most: int | None = None) -> Seen:
    load = value(await asyncio.to_thread(scrape), "autoglm_router_replica_load", replica=address)
    ok = (at_least is None or load >= at_least) and (at_most is None or load <= at_most)
    return Seen(ok, load, await report(address))


async def test_a_conversation_keeps_to_the_replica_holding_its_prefix_unless_it_is_loaded(
    serve, tmp_path: Path, loaded_model
) -> None:
    mesh = await start_mesh(serve, tmp_path, loaded_model)
    second = await serve(build_inference(InferenceConfig(server=EPHEMERAL, intra_op_threads=1), model=loaded_model))
    replicas = (mesh.inference.address, second.address)
    router = await serve(build_router(RouterConfig(
        server=EPHEMERAL, inference_targets=replicas, billing_target=mesh.billing.address,
        data_dir=tmp_path / "router2", admin_token=ADMIN_TOKEN, health_interval_s=0.1)))
    channel = grpc.aio.insecure_channel(router.address)
    routed = Mesh(mesh.billing, mesh.inference, router, channel, mesh.billing_channel, tmp_path / "router2")
    secret, _ = await routed.create_key("acme")

    async def turn(context_id: str, n: int, only_one: bool = True) -> list[str]:
        """Send turn n; the replicas that prefilled anything meanwhile (with only_one: just the one that
        served it, as nothing else runs)."""
        before = {a: await report(a) for a in replicas}
        request = pb2.GenerateRequest(
            model=MODEL, context_id=context_id, cache_policy=pb2.CACHE_POLICY_BYPASS,
            messages=[generation_pb2.ChatMessage(
                role=generation_pb2.CHAT_ROLE_USER,
                content=f"Turn {n} of {context_id}: tell me how the rivers of region {n * 7} shaped its towns.")],
            sampling=generation_pb2.SamplingParams(temperature=0.0, max_tokens=4))
        replies = [r async for r in routed.router_stub.Generate(request, metadata=bearer(secret), timeout=120)]
        assert replies[-1].HasField("summary")
        after = {a: await report(a) for a in replicas}
        served = [a for a in replicas if after[a].prefill_tokens_total > before[a].prefill_tokens_total]
        assert len(served) == 1 or not only_one, f"turn {n} of {context_id} prefilled on {served}"
        return served

    async def hits(address: str) -> int:
        return int((await report(address)).prefix_cache_hits)

    home: dict[str, str] = {}
    for context_id in ("harbour-talk", "valley-talk"):
        [home[context_id]] = await turn(context_id, 1)
        for n in (2, 3, 4):
            start = await hits(home[context_id])
            assert await turn(context_id, n) == [home[context_id]], f"turn {n} of {context_id} left its replica"
            assert await hits(home[context_id]) > start  # the earlier turns came from the prefix cache

    # Load the first conversation's replica directly (the router learns of it only from WatchLoad).
    busy = home["harbour-talk"]
    idle = next(a for a in replicas if a != busy)
    async with grpc.aio.insecure_channel(busy) as load_channel:
        stub = inference_grpc.InferenceServiceStub(load_channel)
        load = [stub.Generate(inference_pb2.GenerateRequest(  # as chat turns: a bare prompt ends at its first token
            messages=[generation_pb2.ChatMessage(role=generation_pb2.CHAT_ROLE_USER,
                                                 content=f"Write a long story about ship number {i}.")],
            tenant_id="other",
            sampling=generation_pb2.SamplingParams(temperature=0.0, max_tokens=512))) for i in range(LOAD_STREAMS)]
        readers = [asyncio.ensure_future(call.read()) for call in load]
        try:
            try:
                await wait_until(lambda: router_sees_load(busy, at_least=LOADED), 60,
                                 "the router to see the loaded replica's WatchLoad report")
            except WaitTimeout as timeout:  # say how the load streams fared, too
                ended = [repr(r.exception()) if r.done() and r.exception() else "first reply" if r.done() else ""
                         for r in readers]
                raise WaitTimeout(f"{timeout}; load streams: {ended}") from None
            # The loaded replica may still be prefilling its own load; the idle one runs nothing else.
            assert idle in await turn("harbour-talk", 5, only_one=False), "the loaded replica was not passed over"
        finally:
            for call in load:
                call.cancel()
            for reader in readers:
                with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
                    await reader
    await wait_until(lambda: router_sees_load(busy, at_most=0), 60, "the loaded replica's sequences to end")
    start = await hits(busy)
    assert await turn("harbour-talk", 6) == [busy]  # a hint, not a move: the conversation returns to its prefix
    assert await hits(busy) > start
    await channel.close()
