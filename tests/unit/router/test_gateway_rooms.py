"""The gateway's rooms know only the rooms before them (plan → admit → dispatch → account → the facade),
and none of them knows a transport (no grpc, no protobuf, no HTTP)."""

from __future__ import annotations

import ast
from pathlib import Path

import services.router.gateway as gateway_package

ROOMS = Path(gateway_package.__file__).parent
MAY_USE = {
    "plan": set(),
    "admit": {"plan"},
    "dispatch": {"plan"},
    "account": {"plan", "dispatch"},
    "facade": {"plan", "admit", "dispatch", "account"},
}
TRANSPORTS = ("grpc", "google.protobuf", "autoglm", "fastapi", "starlette", "services.router.http",
              "services.router.servicer", "services.router.app", "services.router.server")


def imports_of(room: str) -> set[str]:
    tree = ast.parse((ROOMS / f"{room}.py").read_text())
    names = {node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    return names | {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}


def test_each_room_uses_only_the_rooms_before_it() -> None:
    assert {p.stem for p in ROOMS.glob("*.py")} == {*MAY_USE, "__init__"}
    for room, allowed in MAY_USE.items():
        used = {name.rsplit(".", 1)[1] for name in imports_of(room) if name.startswith("services.router.gateway.")}
        assert used <= allowed, (room, used - allowed)
        assert "services.router.gateway" not in imports_of(room), room  # never the package's face


def test_no_room_knows_a_transport() -> None:
    for room in MAY_USE:
        leaked = {name for name in imports_of(room) for t in TRANSPORTS if name == t or name.startswith(t + ".")}
        assert not leaked, (room, leaked)
