"""Free loopback ports for processes the launcher (or a test) starts and tells where to listen.

A port found by binding port 0 comes from the kernel's ephemeral range, the same range it draws the
local port of every outgoing connection from: between finding it and the child binding it, any
connection the machine opens may take it, and two calls may even return the same port. So ports are
drawn below the ephemeral range, checked by binding each one (all held until the whole set is chosen,
so a set never repeats a port), and never handed out twice by one process.
"""

from __future__ import annotations

import random
import socket
import threading
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

_LOWEST = 10_000
_handed_out: set[int] = set()
_lock = threading.Lock()


def _ephemeral_floor() -> int:
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32_768
    return low if low > _LOWEST + 1_000 else 65_536


def _bindable(stack: ExitStack, host: str, port: int) -> bool:
    sock = stack.enter_context(socket.socket())
    try:
        sock.bind((host, port))
    except OSError:
        return False
    return True


def _random_order(items: list[int]) -> Iterator[int]:
    """`items` in a random order, drawn as they are asked for (a few draws for a few ports)."""
    for i in range(len(items)):
        j = random.randrange(i, len(items))
        items[i], items[j] = items[j], items[i]
        yield items[i]


def free_ports(count: int, *, consecutive: bool = False, host: str = "127.0.0.1") -> list[int]:
    """`count` distinct ports nobody listens on now, outside the ephemeral range; a run if `consecutive`."""
    if count <= 0:
        return []
    ceiling = _ephemeral_floor()
    candidates = list(range(_LOWEST, ceiling - count))
    with _lock:
        if not consecutive:  # each port on its own: a process that handed out many still finds the rest
            with ExitStack() as stack:
                run: list[int] = []
                for port in _random_order(candidates):
                    if port not in _handed_out and _bindable(stack, host, port):
                        run.append(port)
                        if len(run) == count:
                            _handed_out.update(run)
                            return run
        else:
            for _ in range(200):
                start = random.choice(candidates)
                run = list(range(start, start + count))
                if _handed_out.intersection(run):
                    continue
                with ExitStack() as stack:
                    if all(_bindable(stack, host, port) for port in run):
                        _handed_out.update(run)
                        return run
    raise OSError(f"no {count} free ports on {host} below {ceiling}")


def free_port(host: str = "127.0.0.1") -> int:
    """One port nobody listens on now, outside the ephemeral range, never handed out before here."""
    return free_ports(1, host=host)[0]


def reserve(ports: list[int] | set[int]) -> None:
    """Ports another party will bind (the mesh file's public ports): never hand them out here."""
    with _lock:
        _handed_out.update(port for port in ports if port > 0)
