"""Over real gRPC, the cost the router reports to the caller is the cost billing's ledger records, to the
micro-unit: prices that need rounding, a version's own price beside the model-wide one, a cached price,
a streamed, a unary and a cached answer."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from fractions import Fraction
from pathlib import Path

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from autoglm.billing.v1 import billing_service_pb2 as billing_pb2
from autoglm.billing.v1 import billing_service_pb2_grpc as billing_grpc
from autoglm.common.v1 import generation_pb2, money_pb2
from autoglm.router.v1 import router_service_pb2 as pb2
from services.billing.config import BillingConfig
from services.billing.server import build_server as build_billing
from services.cli.endpoint import billing_token, operator_channel
from services.inference.config import InferenceConfig
from services.inference.engine.model import LoadedModel
from services.inference.server import build_server as build_inference
from services.router.config import RouterConfig
from services.router.server import build_server as build_router
from tests.integration.router.conftest import ADMIN_TOKEN, EPHEMERAL, MODEL, Mesh

GREEDY = generation_pb2.SamplingParams(temperature=0.0, max_tokens=6)
MODEL_WIDE = (1_234_567, 7_654_321, None)
VERSIONED = (2_345_679, 3_141_593, 271_828)  # micro-units per million tokens: input, output, cached


def price(version: str, amounts: tuple[int, int, int | None]) -> billing_pb2.CreatePriceRequest:
    inp, out, cached = amounts
    p = billing_pb2.Price(model=MODEL, model_version=version,
                          input_per_million=money_pb2.Money(currency_code="USD", micros=inp),
                          output_per_million=money_pb2.Money(currency_code="USD", micros=out))
    if cached is not None:
        p.cached_per_million.CopyFrom(money_pb2.Money(currency_code="USD", micros=cached))
    return billing_pb2.CreatePriceRequest(price=p, actor="test")


def exact_cost(prompt: int, completion: int, cached: bool) -> int:
    inp, out, cached_price = VERSIONED
    total = Fraction((prompt + completion) * cached_price if cached else prompt * inp + completion * out, 10**6)
    return int(total + Fraction(1, 2))


async def ledger_by_case(billing: billing_grpc.BillingServiceStub, want: int) -> dict[str, billing_pb2.UsageReportRow]:
    """The ledger's rows per `case` tag once it holds `want` requests (the router settles just after
    answering), within 10 s."""
    start, end = Timestamp(), Timestamp()
    start.FromDatetime(datetime.now(UTC) - timedelta(hours=1))
    end.FromDatetime(datetime.now(UTC) + timedelta(hours=1))
    request = billing_pb2.GetUsageReportRequest(start_time=start, end_time=end, tenant_id="acme", tag_key="case",
                                                group_by=[billing_pb2.REPORT_DIMENSION_TAG])
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10
    while True:
        report = await billing.GetUsageReport(request, timeout=10)
        if report.total.requests >= want or loop.time() > deadline:
            return {row.group["tag"]: row for row in report.rows}
        await asyncio.sleep(0.05)


async def test_the_cost_the_router_reports_is_the_cost_billing_records(serve, tmp_path: Path,
                                                                       loaded_model: LoadedModel) -> None:
    billing = await serve(build_billing(BillingConfig(server=EPHEMERAL, data_dir=tmp_path / "billing")))
    billing_channel = operator_channel(billing.address, billing_token(tmp_path / "billing"))
    stub = billing_grpc.BillingServiceStub(billing_channel)
    version = loaded_model.manifest.version
    await stub.CreatePrice(price("", MODEL_WIDE), timeout=10)
    await stub.CreatePrice(price(version, VERSIONED), timeout=10)
    inference = await serve(build_inference(InferenceConfig(server=EPHEMERAL, intra_op_threads=1), model=loaded_model))
    router = await serve(build_router(RouterConfig(
        server=EPHEMERAL, inference_targets=(inference.address,), billing_target=billing.address,
        data_dir=tmp_path / "router", admin_token=ADMIN_TOKEN)))
    mesh = Mesh(billing, inference, router, grpc.aio.insecure_channel(router.address), billing_channel,
                tmp_path / "router")
    try:
        secret, _ = await mesh.create_key("acme")
        auth = [("authorization", f"Bearer {secret}")]
        reported: dict[str, pb2.GenerationSummary] = {}
        for case in ("stream", "cached"):
            replies = [r async for r in mesh.router_stub.Generate(
                pb2.GenerateRequest(model=MODEL, prompt="Name a colour.", sampling=GREEDY, tags={"case": case}),
                metadata=auth, timeout=60)]
            reported[case] = replies[-1].summary
        assert not reported["stream"].usage.cached and reported["cached"].usage.cached
        unary = await mesh.router_stub.Complete(pb2.CompleteRequest(
            model=MODEL, messages=[generation_pb2.ChatMessage(role=generation_pb2.CHAT_ROLE_USER, content="Say hi.")],
            sampling=GREEDY, tags={"case": "unary"}), metadata=auth, timeout=60)

        rows = await ledger_by_case(stub, want=3)
        for case, usage, cost, answered in (
                ("stream", reported["stream"].usage, reported["stream"].cost, reported["stream"].model_version),
                ("cached", reported["cached"].usage, reported["cached"].cost, reported["cached"].model_version),
                ("unary", unary.usage, unary.cost, unary.model_version)):
            assert answered == version
            assert cost.micros == exact_cost(usage.prompt_tokens, usage.completion_tokens, usage.cached), case
            assert cost.currency_code == "USD"
            row = rows[case]
            assert (row.requests, row.cached_requests) == (1, int(usage.cached)), case
            assert (row.prompt_tokens, row.completion_tokens) == (usage.prompt_tokens, usage.completion_tokens)
            assert row.cost.micros == cost.micros, case
    finally:
        await mesh.channel.close()
        await billing_channel.close()


async def test_a_price_put_in_force_at_once_is_charged_as_the_router_quoted_it(serve, tmp_path: Path,
                                                                              loaded_model: LoadedModel) -> None:
    """The router quotes from a table it refreshes every few seconds; a new price in force at once reaches
    billing first. The event names the quoted price, and billing charges it (it was in force within the
    quote grace): the caller's cost and the ledger's agree to the micro-unit."""
    billing = await serve(build_billing(BillingConfig(server=EPHEMERAL, data_dir=tmp_path / "billing")))
    billing_channel = operator_channel(billing.address, billing_token(tmp_path / "billing"))
    stub = billing_grpc.BillingServiceStub(billing_channel)
    await stub.CreatePrice(price("", MODEL_WIDE), timeout=10)
    inference = await serve(build_inference(InferenceConfig(server=EPHEMERAL, intra_op_threads=1), model=loaded_model))
    router = await serve(build_router(RouterConfig(
        server=EPHEMERAL, inference_targets=(inference.address,), billing_target=billing.address,
        # A stale table: without billing leases no change feed pushes the new price, the table is polled.
        data_dir=tmp_path / "router", admin_token=ADMIN_TOKEN, price_refresh_s=3600, billing_leases=False)))
    mesh = Mesh(billing, inference, router, grpc.aio.insecure_channel(router.address), billing_channel,
                tmp_path / "router")
    try:
        secret, _ = await mesh.create_key("acme")
        await stub.CreatePrice(price("", (9_000_001, 9_000_003, None)), timeout=10)  # in force now
        reply = await mesh.router_stub.Complete(pb2.CompleteRequest(
            model=MODEL, prompt="Name a colour.", sampling=GREEDY, tags={"case": "changed"}),
            metadata=[("authorization", f"Bearer {secret}")], timeout=60)
        inp, out, _ = MODEL_WIDE
        quoted = int(Fraction(reply.usage.prompt_tokens * inp + reply.usage.completion_tokens * out, 10**6)
                     + Fraction(1, 2))
        assert reply.cost.micros == quoted  # the router's table still has the old price
        rows = await ledger_by_case(stub, want=1)
        assert rows["changed"].cost.micros == reply.cost.micros
    finally:
        await mesh.channel.close()
        await billing_channel.close()
