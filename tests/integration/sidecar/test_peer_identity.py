"""The outbound side pins the peer's SPIFFE id exactly (not only its DNS name); both sides speak TLS 1.2
at least and prefer 1.3."""

from __future__ import annotations

import asyncio
import socket
import ssl
from pathlib import Path

import grpc
import pytest

from autoglm.inference.v1 import inference_service_pb2 as pb
from autoglm.inference.v1 import inference_service_pb2_grpc as pb_grpc
from sidecar import certs
from sidecar.peer_tls import ClientTls, PeerConnector
from sidecar.runtime import SidecarConfig, build_sidecar
from tests.integration.sidecar.conftest import Mesh
from tests.integration.sidecar.upstreams import FakeInference


async def start_impostor(pki: Path, tmp_path: Path, fake: FakeInference) -> tuple[grpc.aio.Server, int]:
    """An InferenceService with a certificate from the mesh CA, DNS name `inference`, but the SPIFFE id of
    another namespace."""
    pair = certs.issue(certs.read_pair(pki, "ca"), "inference", namespace="elsewhere")
    assert certs.uri_sans(pair.cert_pem) == ("spiffe://autoglm.local/ns/elsewhere/sa/inference",)
    server = grpc.aio.server()
    pb_grpc.add_InferenceServiceServicer_to_server(fake, server)
    port = server.add_secure_port("127.0.0.1:0", grpc.ssl_server_credentials(
        [(pair.key_pem, pair.cert_pem)], root_certificates=(pki / "ca.pem").read_bytes(), require_client_auth=True))
    await server.start()
    return server, port


async def test_a_peer_with_the_wrong_spiffe_id_is_refused_before_the_call(pki: Path, tmp_path: Path,
                                                                           mesh: Mesh) -> None:
    impostor_fake = FakeInference()
    impostor, port = await start_impostor(pki, tmp_path, impostor_fake)
    router = await build_sidecar(SidecarConfig(
        policy_path=mesh.policy, service="router", certs_dir=pki, upstream="127.0.0.1:1", metrics_port=None,
        peers={"inference": [f"127.0.0.1:{port}"]}))
    try:
        async with grpc.aio.insecure_channel(router.outbound_address) as chan:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await pb_grpc.InferenceServiceStub(chan).CountTokens(pb.CountTokensRequest(prompt="a"), timeout=5)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert impostor_fake.record.calls == 0  # the request never reached it
        assert router._connector.relay(f"127.0.0.1:{port}", "inference",
                                       "spiffe://autoglm.local/ns/default/sa/inference").refused >= 1
        # The genuine inference sidecar, same router sidecar code: accepted.
        async with mesh.router_outbound() as chan:
            reply = await pb_grpc.InferenceServiceStub(chan).CountTokens(pb.CountTokensRequest(prompt="a b"), timeout=5)
        assert reply.token_count == 2
    finally:
        await router.stop(grace=0)
        await impostor.stop(grace=0)


def handshake(address: str, pki: Path, maximum: ssl.TLSVersion | None = None) -> str:
    host, port = address.rsplit(":", 1)
    ctx = ssl.create_default_context(cafile=str(pki / "ca.pem"))
    ctx.check_hostname = False
    ctx.load_cert_chain(str(pki / "router.pem"), str(pki / "router.key"))
    ctx.set_alpn_protocols(["h2"])
    if maximum is not None:
        ctx.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
        ctx.maximum_version = maximum
    with socket.create_connection((host, int(port)), timeout=5) as raw, ctx.wrap_socket(raw) as tls:
        return str(tls.version())


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1_1 is deprecated:DeprecationWarning")
def test_inbound_prefers_tls13_and_refuses_below_tls12(mesh: Mesh) -> None:
    assert handshake(mesh.inference_sidecar.inbound_address, mesh.pki) == "TLSv1.3"
    assert handshake(mesh.inference_sidecar.inbound_address, mesh.pki, ssl.TLSVersion.TLSv1_2) == "TLSv1.2"
    with pytest.raises((ssl.SSLError, OSError)):
        handshake(mesh.inference_sidecar.inbound_address, mesh.pki, ssl.TLSVersion.TLSv1_1)


def test_outbound_tls_context_sets_tls12_as_the_minimum(pki: Path) -> None:
    context = ClientTls(certs.CertFiles(pki, "router")).context()
    assert context.minimum_version == ssl.TLSVersion.TLSv1_2
    assert context.maximum_version == ssl.TLSVersion.MAXIMUM_SUPPORTED


async def relay_round_trip(pki: Path, tmp_path: Path, server_cert: certs.KeyPair) -> tuple[bytes, int]:
    """Bytes written to a PeerRelay's socket reach a TLS server holding `server_cert` and come back."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    (tmp_path / "s.pem").write_bytes(server_cert.cert_pem)
    (tmp_path / "s.key").write_bytes(server_cert.key_pem)
    ctx.load_cert_chain(tmp_path / "s.pem", tmp_path / "s.key")
    ctx.load_verify_locations(cafile=str(pki / "ca.pem"))
    ctx.verify_mode = ssl.CERT_REQUIRED

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(await reader.read(100))
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(echo, "127.0.0.1", 0, ssl=ctx)
    port = server.sockets[0].getsockname()[1]
    connector = PeerConnector(certs.CertFiles(pki, "router"), ())
    try:
        relay = connector.relay(f"127.0.0.1:{port}", "inference", "spiffe://autoglm.local/ns/default/sa/inference")
        reader, writer = await asyncio.open_unix_connection(str(relay.path))
        writer.write(b"ping")
        await writer.drain()
        try:
            answer = await asyncio.wait_for(reader.read(100), 5)
        except ConnectionResetError:  # refused: closed with our bytes unread
            answer = b""
        writer.close()
        return answer, relay.refused
    finally:
        await connector.close()
        server.close()


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_the_relay_carries_bytes_to_the_right_peer_and_refuses_the_wrong_one(pki: Path, tmp_path: Path,
                                                                             loop: str) -> None:
    """On both event loops the sidecar runs on (uvloop in production)."""
    import uvloop

    ca = certs.read_pair(pki, "ca")
    factory = uvloop.new_event_loop if loop == "uvloop" else asyncio.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        assert runner.run(relay_round_trip(pki, tmp_path, certs.read_pair(pki, "inference"))) == (b"ping", 0)
        wrong = certs.issue(ca, "inference", namespace="elsewhere")
        assert runner.run(relay_round_trip(pki, tmp_path, wrong)) == (b"", 1)
