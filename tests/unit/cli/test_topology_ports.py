"""The internal ports `autoglm up` hands its children: never one an outgoing connection can take in the
meantime (the kernel's ephemeral range), never one of the mesh file's ports, never the same one twice —
and a second gRPC server on a taken port fails instead of silently sharing it."""

from __future__ import annotations

import re
import socket
from pathlib import Path

import pytest

from services.cli.mesh_config import MeshConfig
from services.cli.topology import plan
from services.common import ports
from services.common.grpc_server import start_server


def ephemeral_range() -> range:
    low, high = (int(x) for x in Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    return range(low, high + 1)


def ports_in(argv: list[str]) -> set[int]:
    found = set()
    for arg in argv:
        found.update(int(p) for p in re.findall(r"127\.0\.0\.1:(\d+)", arg))
    for flag in ("--port", "--inbound-port", "--outbound-port", "--metrics-port", "--http-port"):
        if flag in argv:
            found.add(int(argv[argv.index(flag) + 1]))
    return {p for p in found if p > 0}


@pytest.mark.parametrize("sidecar", ["python", "envoy"])
def test_internal_ports_avoid_the_ephemeral_range_the_mesh_ports_and_each_other(tmp_path: Path,
                                                                              sidecar: str) -> None:
    mesh = MeshConfig(data_dir=tmp_path, inference_replicas=3)
    public = {mesh.router_port, mesh.router_http_port, mesh.billing_port, mesh.router_metrics_port,
              mesh.billing_metrics_port, *(mesh.inference_base_port + i for i in range(3)),
              *(mesh.inference_metrics_port + i for i in range(3))}
    top = plan(mesh, None, sidecar)
    internal = [spec.ready_address for spec in top.specs if int(spec.ready_address.rsplit(":", 1)[1]) not in public]
    assert len(internal) >= 4
    every = set().union(*(ports_in(spec.argv) for spec in top.specs)) - public
    assert every, "the plan names internal ports"
    assert not every & set(ephemeral_range()), sorted(every & set(ephemeral_range()))
    listens = [int(spec.ready_address.rsplit(":", 1)[1]) for spec in top.specs]
    assert len(listens) == len(set(listens)), listens


def test_a_set_never_repeats_a_port_and_a_run_is_consecutive() -> None:
    many = ports.free_ports(40)
    assert len(set(many)) == 40
    run = ports.free_ports(4, consecutive=True)
    assert run == list(range(run[0], run[0] + 4))
    assert not set(run) & set(many), "a port is never handed out twice by one process"


def test_a_port_someone_listens_on_is_not_handed_out() -> None:
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        taken = held.getsockname()[1]
        ports.reserve([taken + 1])
        assert all(p not in (taken, taken + 1) for p in ports.free_ports(200))


async def test_a_second_grpc_server_on_a_taken_port_fails_to_bind() -> None:
    first = await start_server("first", lambda server: [])
    try:
        with pytest.raises((OSError, RuntimeError)):
            await start_server("second", lambda server: [], port=first.port)
    finally:
        await first.stop(0)


def test_a_process_that_handed_out_thousands_of_ports_still_gets_a_large_set(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ports, "_handed_out", set(ports._handed_out))  # this test's reservations end with it
    low = 10_000
    ports.reserve(set(range(low, low + 30_000, 7)))  # about one candidate in seven taken, all over the range
    many = ports.free_ports(300)
    assert len(set(many)) == 300 and all((p - low) % 7 for p in many)
