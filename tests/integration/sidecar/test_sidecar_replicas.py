"""A service run as several copies behind one sidecar (`router.replicas`): each call goes to the healthy
copy with the fewest calls in flight, a copy that drains (NOT_SERVING) or stops gets no new calls, and the
TLS-passthrough TCP balancer hands each connection to the copy with the fewest open ones."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from autoglm.inference.v1 import inference_service_pb2 as pb
from autoglm.inference.v1 import inference_service_pb2_grpc as pb_grpc
from services.common.grpc_server import RunningServer
from sidecar.runtime import RunningSidecar, SidecarConfig, build_sidecar
from sidecar.tcp_balancer import TcpBalancer
from tests.integration.sidecar.conftest import client_credentials, mtls_channel, write_policy
from tests.integration.sidecar.upstreams import FakeInference, start_fake_inference
from tests.waiting import wait_until


async def _copies(serve, count: int) -> tuple[list[FakeInference], list[RunningServer]]:
    fakes = [FakeInference() for _ in range(count)]
    servers = [await serve(start_fake_inference(fake)) for fake in fakes]
    return fakes, servers


@pytest.fixture
async def sidecars() -> AsyncIterator[list[RunningSidecar]]:
    started: list[RunningSidecar] = []
    try:
        yield started
    finally:
        for running in started:
            await running.stop(grace=0)


async def _front(pki: Path, tmp_path: Path, servers: list[RunningServer], started: list[RunningSidecar]
                 ) -> pb_grpc.InferenceServiceStub:
    running = await build_sidecar(SidecarConfig(
        policy_path=write_policy(tmp_path / "policy.yaml"), service="inference", certs_dir=pki,
        upstream=",".join(s.address for s in servers), outbound_port=None, metrics_port=None,
        watch_interval_s=0.05, health_interval_s=0.05))
    started.append(running)
    channel = mtls_channel(running.inbound_address, client_credentials(pki, "router"), "inference")
    return pb_grpc.InferenceServiceStub(channel)


async def test_calls_go_to_the_copy_with_the_fewest_in_flight(pki: Path, tmp_path: Path, serve, sidecars) -> None:
    fakes, servers = await _copies(serve, 3)
    stub = await _front(pki, tmp_path, servers, sidecars)
    await wait_until(lambda: _all_answer(stub), 10, "the sidecar to reach its three upstreams")
    for fake in fakes:
        fake.behaviour.hang = True
    held = stub.Generate(pb.GenerateRequest(prompt="hold"), timeout=30)
    held_task = asyncio.ensure_future(held.read())
    await wait_until(lambda: any(f.record.hanging.is_set() for f in fakes), 5, "the held call to reach a copy")
    busy = next(i for i, f in enumerate(fakes) if f.record.hanging.is_set())
    for fake in fakes:
        fake.behaviour.hang = False
    before = [f.record.calls for f in fakes]
    for _ in range(8):
        await stub.CountTokens(pb.CountTokensRequest(prompt="a b"), timeout=5)
    got = [f.record.calls - b for f, b in zip(fakes, before, strict=True)]
    idle = [g for i, g in enumerate(got) if i != busy]
    assert got[busy] == 0, f"calls went to the copy with a call in flight: {got}"
    assert sum(idle) == 8 and min(idle) > 0, f"the idle copies did not share the calls: {got}"
    held.cancel()
    held_task.cancel()


async def _all_answer(stub: pb_grpc.InferenceServiceStub) -> bool:
    try:
        await stub.CountTokens(pb.CountTokensRequest(prompt="x"), timeout=2)
        return True
    except grpc.aio.AioRpcError:
        return False


async def test_a_draining_or_stopped_copy_gets_no_new_calls(pki: Path, tmp_path: Path, serve, sidecars) -> None:
    fakes, servers = await _copies(serve, 3)
    stub = await _front(pki, tmp_path, servers, sidecars)
    await wait_until(lambda: _all_answer(stub), 10, "the sidecar to reach its three upstreams")
    await servers[1].set_serving(False)  # draining: health says NOT_SERVING, the port still answers
    await servers[2].server.stop(0)  # gone: connection refused

    async def only_the_first() -> bool:
        before = [f.record.calls for f in fakes]
        for _ in range(6):
            await stub.CountTokens(pb.CountTokensRequest(prompt="x"), timeout=5)
        return fakes[0].record.calls - before[0] == 6 and fakes[1].record.calls == before[1]

    await wait_until(only_the_first, 5, "every call to go to the one healthy copy")
    for _ in range(20):  # and from then on, no call fails
        await stub.CountTokens(pb.CountTokensRequest(prompt="x"), timeout=5)
    await servers[1].set_serving(True)
    await wait_until(lambda: _reaches(stub, fakes[1]), 5, "the copy serving again to get calls again")


async def _reaches(stub: pb_grpc.InferenceServiceStub, fake: FakeInference) -> bool:
    before = fake.record.calls
    for _ in range(4):
        await stub.CountTokens(pb.CountTokensRequest(prompt="x"), timeout=5)
    return fake.record.calls > before


# --- the TLS-passthrough TCP balancer --------------------------------------------------------------------

async def _tls_server(pki: Path, name: str) -> tuple[asyncio.Server, int]:
    """A TLS server (the router's certificate) that answers each line with its name, like a router's HTTPS."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(pki / "router.pem", pki / "router.key")

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while await reader.readline():
            writer.write(f"{name}\n".encode())
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=context)
    return server, int(server.sockets[0].getsockname()[1])


async def _ask(port: int, pki: Path) -> tuple[str, asyncio.StreamWriter]:
    context = ssl.create_default_context(cafile=str(pki / "ca.pem"))
    context.check_hostname = False  # the mesh certificate names a SPIFFE id, not 127.0.0.1
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=context)
    writer.write(b"who\n")
    await writer.drain()
    return (await asyncio.wait_for(reader.readline(), 5)).decode().strip(), writer


async def test_the_tcp_balancer_passes_tls_through_to_the_copy_with_the_fewest_connections(pki: Path) -> None:
    servers = [await _tls_server(pki, name) for name in ("a", "b", "c")]
    balancer = TcpBalancer([f"127.0.0.1:{port}" for _, port in servers])
    port = await balancer.start("127.0.0.1", 0)
    writers: list[asyncio.StreamWriter] = []
    try:
        first, held = await _ask(port, pki)  # stays open
        writers.append(held)
        names = []
        for _ in range(4):  # each closed before the next: they avoid the copy holding a connection
            name, writer = await _ask(port, pki)
            names.append(name)
            writer.close()
            await writer.wait_closed()
            await wait_until(lambda: sum(b.open for b in balancer.backends) == 1, 5, "the connection to close")
        assert first not in names and len(set(names)) == 2, (first, names)
        stopped = next(i for i, n in enumerate("abc") if n not in (first,))
        servers[stopped][0].close()
        await servers[stopped][0].wait_closed()
        for _ in range(4):  # a copy that refuses connections costs a client nothing
            name, writer = await _ask(port, pki)
            assert name != "abc"[stopped]
            writers.append(writer)
    finally:
        for writer in writers:
            writer.close()
        await balancer.stop()
        for server, _ in servers:
            server.close()
