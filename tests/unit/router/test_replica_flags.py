"""The flags `autoglm up` gives router i of `router.replicas`: the replicas' mesh addresses dialled through
this router's own listeners, and the first router's admin token and key pepper."""

from __future__ import annotations

import argparse
from pathlib import Path

from grpc_health.v1 import health_pb2

from services.common.config import ServerSettings
from services.common.grpc_server import start_server
from services.router.__main__ import _add_arguments, config_from
from services.router.inference_client import GrpcInference


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", type=Path, default=None)
    _add_arguments(parser)
    return parser.parse_args(list(argv))


async def test_a_replica_is_named_by_its_mesh_address_and_dialled_through_this_routers_listener(
        tmp_path: Path, serve) -> None:
    config = config_from(ServerSettings(port=0), parse(
        "--inference", "127.0.0.1:50071,127.0.0.1:50072",
        "--inference-via", "127.0.0.1:50071=127.0.0.1:31001,127.0.0.1:50072=127.0.0.1:31002",
        "--data-dir", str(tmp_path / "router-1")))
    assert config.inference_targets == ("127.0.0.1:50071", "127.0.0.1:50072")
    assert config.inference_dial == {"127.0.0.1:50071": "127.0.0.1:31001", "127.0.0.1:50072": "127.0.0.1:31002"}
    # A real server stands in for this router's listener: the replica's mesh name reaches it.
    listener = await serve(start_server("listener", lambda server: []))
    client = GrpcInference(dial={"127.0.0.1:50071": listener.address})
    check = client.channel("127.0.0.1:50071").unary_unary(
        "/grpc.health.v1.Health/Check", request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
        response_deserializer=health_pb2.HealthCheckResponse.FromString)
    assert (await check(health_pb2.HealthCheckRequest(), timeout=10)).status == health_pb2.HealthCheckResponse.SERVING


def test_further_routers_share_the_first_routers_admin_token_and_key_pepper(tmp_path: Path) -> None:
    shared = tmp_path / "router"
    first = config_from(ServerSettings(port=0), parse("--data-dir", str(shared), "--shared-secrets-dir", str(shared)))
    second = config_from(ServerSettings(port=0), parse("--data-dir", str(tmp_path / "router-1"),
                                                       "--shared-secrets-dir", str(shared)))
    assert first.admin_token and second.admin_token == first.admin_token
    assert second.key_pepper_path == str(shared / "key_pepper")
    assert (shared / "admin_token").read_text() == first.admin_token
