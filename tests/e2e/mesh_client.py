"""What drills do against a running mesh: keys per tenant, streaming calls, and billing's totals."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

import grpc
from google.protobuf import timestamp_pb2

from autoglm.billing.v1 import billing_service_pb2, billing_service_pb2_grpc
from autoglm.common.v1 import generation_pb2
from autoglm.router.v1 import admin_service_pb2, admin_service_pb2_grpc, router_service_pb2, router_service_pb2_grpc
from services.cli.endpoint import billing_token, load_endpoint, operator_channel
from tests.e2e.mesh_process import Mesh

MODEL = "smollm2-135m-instruct"


def router_channel(mesh: Mesh) -> grpc.aio.Channel:
    if mesh.tls:
        credentials = grpc.ssl_channel_credentials(open(mesh.ca_cert, "rb").read())
        return grpc.aio.secure_channel(mesh.router, credentials)
    return grpc.aio.insecure_channel(mesh.router)


async def create_key(mesh: Mesh, tenant: str) -> str:
    token = (mesh.data_dir / "router" / "admin_token").read_text().strip()
    async with router_channel(mesh) as channel:
        reply = await admin_service_pb2_grpc.AdminServiceStub(channel).CreateApiKey(
            admin_service_pb2.CreateApiKeyRequest(tenant_id=tenant, name=f"drill {tenant}"),
            metadata=(("authorization", f"Bearer {token}"),), timeout=10)
    return str(reply.secret)


def generate_request(prompt: str, max_tokens: int, *, seed: int = 0) -> router_service_pb2.GenerateRequest:
    return router_service_pb2.GenerateRequest(
        model=MODEL, prompt=prompt, cache_policy=router_service_pb2.CACHE_POLICY_BYPASS,
        sampling=generation_pb2.SamplingParams(max_tokens=max_tokens, temperature=0.8, seed=seed))


@dataclass
class StreamOutcome:
    tokens: int = 0
    code: grpc.StatusCode = grpc.StatusCode.OK
    summary_completion_tokens: int | None = None


async def stream(stub: router_service_pb2_grpc.RouterServiceStub, key: str,
                 request: router_service_pb2.GenerateRequest, timeout: float = 120,
                 on_token: object = None) -> StreamOutcome:
    outcome = StreamOutcome()
    try:
        async for message in stub.Generate(request, metadata=(("authorization", f"Bearer {key}"),), timeout=timeout):
            outcome.tokens += message.delta_tokens
            if message.HasField("summary"):
                outcome.summary_completion_tokens = message.summary.usage.completion_tokens
            if callable(on_token) and message.delta_tokens:
                on_token()
    except grpc.aio.AioRpcError as error:
        outcome.code = error.code()
    return outcome


@dataclass
class Totals:
    requests: int
    prompt_tokens: int
    completion_tokens: int
    by_status: dict[str, int]


async def usage_totals(mesh: Mesh, tenant: str) -> Totals:
    """Billing's totals for `tenant` (through billing's operator address, as `autoglm usage` does)."""
    billing = load_endpoint(mesh.data_dir).billing
    end = dt.datetime.now(dt.UTC) + dt.timedelta(minutes=5)
    start_ts, end_ts = timestamp_pb2.Timestamp(), timestamp_pb2.Timestamp()
    start_ts.FromDatetime(end - dt.timedelta(hours=2))
    end_ts.FromDatetime(end)
    async with operator_channel(billing, billing_token(mesh.data_dir)) as channel:
        stub = billing_service_pb2_grpc.BillingServiceStub(channel)
        reply = await stub.GetUsageReport(billing_service_pb2.GetUsageReportRequest(
            start_time=start_ts, end_time=end_ts, tenant_id=tenant,
            group_by=[billing_service_pb2.REPORT_DIMENSION_STATUS]), timeout=30)
    return Totals(reply.total.requests, reply.total.prompt_tokens, reply.total.completion_tokens,
                  {row.group["status"]: row.requests for row in reply.rows})
