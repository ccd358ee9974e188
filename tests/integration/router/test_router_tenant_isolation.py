"""Tenants never see each other's generations: the response cache and single-flight are keyed by
tenant, unless both tenants' policies explicitly share the model's cache; a replica's prefix cache
shares prompt blocks within one tenant only."""

from __future__ import annotations

import asyncio

import grpc

from autoglm.common.v1 import generation_pb2
from autoglm.inference.v1 import inference_service_pb2 as inference_pb2
from autoglm.inference.v1 import inference_service_pb2_grpc as inference_grpc
from autoglm.router.v1 import admin_service_pb2 as admin_pb2
from autoglm.router.v1 import router_service_pb2 as pb2
from tests.integration.router.conftest import ADMIN_TOKEN, MODEL, Mesh
from tests.integration.router.test_router_vertical import bearer

ADMIN = [("authorization", f"Bearer {ADMIN_TOKEN}")]


def ask(prompt: str, max_tokens: int) -> pb2.CompleteRequest:
    return pb2.CompleteRequest(model=MODEL, prompt=prompt,
                               sampling=generation_pb2.SamplingParams(temperature=0.0, max_tokens=max_tokens))


async def share(mesh: Mesh, tenant: str) -> None:
    await mesh.admin.SetPolicy(admin_pb2.SetPolicyRequest(
        tenant_id=tenant, policy=admin_pb2.Policy(name=f"{tenant}-shares", shared_cache_models=[MODEL])),
        metadata=ADMIN, timeout=10)


async def test_one_tenants_answer_is_never_a_cache_hit_or_shared_generation_for_another(mesh: Mesh) -> None:
    acme, _ = await mesh.create_key("acme")
    globex, _ = await mesh.create_key("globex")
    stub = mesh.router_stub

    # One after the other: acme's answer is cached for acme only.
    first = await stub.Complete(ask("Name a colour.", 4), metadata=bearer(acme), timeout=120)
    assert not first.usage.cached
    assert (await stub.Complete(ask("Name a colour.", 4), metadata=bearer(acme), timeout=60)).usage.cached
    other = await stub.Complete(ask("Name a colour.", 4), metadata=bearer(globex), timeout=120)
    assert not other.usage.cached, "globex was answered from acme's cached generation"

    # At the same time: each tenant runs its own generation (no coalescing across tenants).
    replies = await asyncio.gather(
        stub.Complete(ask("Name a fruit.", 12), metadata=bearer(acme), timeout=120),
        stub.Complete(ask("Name a fruit.", 12), metadata=bearer(globex), timeout=120))
    assert [r.usage.cached for r in replies] == [False, False], "a generation was shared across tenants"

    # A tenant that shares the model's cache still does not meet a tenant that does not.
    await share(mesh, "acme")
    alone = await stub.Complete(ask("Name a colour.", 4), metadata=bearer(acme), timeout=120)
    assert not alone.usage.cached


async def test_tenants_whose_policies_share_the_model_share_cache_and_generations(mesh: Mesh) -> None:
    acme, _ = await mesh.create_key("acme")
    globex, _ = await mesh.create_key("globex")
    await share(mesh, "acme")
    await share(mesh, "globex")
    stub = mesh.router_stub

    first = await stub.Complete(ask("Name a colour.", 4), metadata=bearer(acme), timeout=120)
    second = await stub.Complete(ask("Name a colour.", 4), metadata=bearer(globex), timeout=60)
    assert not first.usage.cached and second.usage.cached
    assert second.choices[0].text == first.choices[0].text

    replies = await asyncio.gather(
        stub.Complete(ask("Name a fruit.", 12), metadata=bearer(acme), timeout=120),
        stub.Complete(ask("Name a fruit.", 12), metadata=bearer(globex), timeout=120))
    assert sorted(r.usage.cached for r in replies) == [False, True]
    assert replies[0].choices[0].text == replies[1].choices[0].text


async def test_the_replicas_prefix_cache_is_shared_within_a_tenant_only(mesh: Mesh) -> None:
    acme, _ = await mesh.create_key("acme")
    globex, _ = await mesh.create_key("globex")
    stub = mesh.router_stub

    async def hits() -> int:
        async with grpc.aio.insecure_channel(mesh.inference.address) as channel:
            call = inference_grpc.InferenceServiceStub(channel).WatchLoad(inference_pb2.WatchLoadRequest(interval_ms=50))
            report = await asyncio.wait_for(call.read(), 30)
            call.cancel()
            return int(report.prefix_cache_hits)

    prompt = "A long note about the harbour, its boats, its tides and the people who work there. " * 6
    await stub.Complete(ask(prompt, 3), metadata=bearer(acme), timeout=120)
    before = await hits()
    await stub.Complete(ask(prompt, 4), metadata=bearer(globex), timeout=120)  # another tenant: its own prefill
    assert await hits() == before
    await stub.Complete(ask(prompt, 5), metadata=bearer(acme), timeout=120)  # the same tenant: the cached blocks
    assert await hits() > before
