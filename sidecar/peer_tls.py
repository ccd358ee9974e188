"""Outbound mTLS with an exact peer identity check.

grpc's Python channels can pin a peer only by DNS name; the mesh identity is the SPIFFE URI SAN. So the
sidecar originates the TLS itself: each peer endpoint gets a relay on a unix socket in a private (0700)
directory; the endpoint's grpc channel speaks plaintext HTTP/2 to it, and the relay carries every
connection over its own TLS connection to the peer, after checking that the peer's certificate (signed by
the mesh CA) carries exactly the expected SPIFFE id among its URI SANs, as the rendered Envoy config's
`match_typed_subject_alt_names` does. A peer that presents another identity is disconnected before a
byte of the call is sent (the caller sees UNAVAILABLE; the log names both identities).

TLS 1.2 is the minimum, TLS 1.3 preferred (the highest both sides speak is used). A new connection uses
the certificates in force (`CertFiles`), so a renewal applies to new connections while established
ones carry on.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
import ssl
import tempfile
from pathlib import Path
from typing import Any

import grpc
import structlog

from sidecar.certs import CertFiles

log = structlog.get_logger("sidecar")

CONNECT_TIMEOUT_S = 5.0
MIN_TLS_VERSION = ssl.TLSVersion.TLSv1_2


class ClientTls:
    """The TLS client context for the certificates in force, rebuilt when they change."""

    def __init__(self, certs: CertFiles) -> None:
        self.certs = certs
        self._version = -1
        self._context: ssl.SSLContext | None = None

    def context(self) -> ssl.SSLContext:
        if self._context is None or self._version != self.certs.version:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            ctx.minimum_version = MIN_TLS_VERSION
            ctx.check_hostname = False  # the identity is the URI SAN, checked after the handshake
            ctx.verify_mode = ssl.CERT_REQUIRED
            ctx.load_verify_locations(cadata=self.certs.ca_pem.decode())
            ctx.set_alpn_protocols(["h2"])
            # load_cert_chain reads files; CertFiles has checked that this pair belongs together.
            with tempfile.TemporaryDirectory() as tmp:
                chain, key = Path(tmp) / "c.pem", Path(tmp) / "k.pem"
                chain.write_bytes(self.certs.pair.cert_pem)
                key.touch(mode=0o600)
                key.write_bytes(self.certs.pair.key_pem)
                ctx.load_cert_chain(chain, key)
            self._context, self._version = ctx, self.certs.version
        return self._context


def presented_identities(tls: asyncio.BaseTransport) -> tuple[str, ...]:
    cert = tls.get_extra_info("peercert") or {}
    return tuple(value for kind, value in cert.get("subjectAltName", ()) if kind == "URI")


class _Pipe(asyncio.Protocol):
    """One side of a relayed connection: what it reads, the other side writes (with back-pressure)."""

    def __init__(self) -> None:
        self.transport: Any = None  # an asyncio.Transport (uvloop's do not subclass it)
        self.other: _Pipe | None = None
        self._held: list[bytes] = []  # read before the other side is attached (e.g. the peer's SETTINGS)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def attach(self, other: _Pipe) -> None:
        self.other = other
        assert other.transport is not None
        for data in self._held:
            other.transport.write(data)
        self._held.clear()

    def data_received(self, data: bytes) -> None:
        if self.other is None:
            self._held.append(data)
        elif self.other.transport is not None:
            self.other.transport.write(data)

    def eof_received(self) -> bool | None:
        self._close_other()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._close_other()

    closed = False

    def pause_writing(self) -> None:
        if self.other is not None and self.other.transport is not None:
            self.other.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.other is not None and self.other.transport is not None:
            self.other.transport.resume_reading()

    def _close_other(self) -> None:
        if self.other is not None and self.other.transport is not None:
            self.other.transport.close()


class _Local(_Pipe):
    """grpc's plaintext side: held (not read) until the verified TLS connection to the peer is up."""

    def __init__(self, relay: PeerRelay) -> None:
        super().__init__()
        self.relay = relay

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        assert self.transport is not None
        self.transport.pause_reading()
        self.relay.spawn(self._connect())

    async def _connect(self) -> None:
        relay, local = self.relay, self.transport
        assert local is not None
        remote = _Pipe()
        try:
            tls, _ = await asyncio.wait_for(asyncio.get_running_loop().create_connection(
                lambda: remote, relay.host, relay.port, ssl=relay.tls.context(), server_hostname=relay.peer),
                CONNECT_TIMEOUT_S)
        except (OSError, ssl.SSLError, TimeoutError, ValueError) as exc:
            log.warning("peer_connect_failed", peer=relay.peer, address=relay.address, error=str(exc) or type(exc).__name__)
            local.close()
            return
        presented = presented_identities(tls)
        if relay.identity not in presented:
            log.error("peer_identity_refused", peer=relay.peer, address=relay.address, expected=relay.identity,
                      presented=list(presented))
            relay.refused += 1
            tls.close()
            local.close()
            return
        if local.is_closing() or remote.closed:
            tls.close()
            local.close()
            return
        remote.attach(self)
        self.attach(remote)
        local.resume_reading()


class PeerRelay:
    """The relay for one peer endpoint: a unix socket grpc connects to, carried over verified mTLS."""

    def __init__(self, address: str, peer: str, identity: str, tls: ClientTls, path: Path) -> None:
        host, _, port = address.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"peer {peer}: expected HOST:PORT, got {address!r}")
        self.address, self.host, self.port = address, host.strip("[]"), int(port)
        self.peer, self.identity, self.tls, self.path = peer, identity, tls, path
        self.refused = 0
        self._tasks: set[asyncio.Task[None]] = set()
        # Bound and listening now, so a channel may connect at once; accepted once the server runs.
        self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._socket.bind(str(path))
        self._socket.listen(128)
        self._server: asyncio.AbstractServer | None = None
        self.spawn(self._serve())

    async def _serve(self) -> None:
        self._server = await asyncio.get_running_loop().create_unix_server(lambda: _Local(self), sock=self._socket)

    def spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    @property
    def target(self) -> str:
        return f"unix:{self.path}"

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._server is not None:
            self._server.close()
        self._socket.close()


class PeerConnector:
    """Makes the grpc channels to peer endpoints, each through its relay (one relay per endpoint)."""

    def __init__(self, certs: CertFiles, options: tuple[tuple[str, Any], ...]) -> None:
        self.tls = ClientTls(certs)
        self._options = options
        self._dir = Path(tempfile.mkdtemp(prefix="autoglm-sidecar-"))  # mode 0700: only this user connects
        self._relays: dict[tuple[str, str], PeerRelay] = {}

    def relay(self, address: str, peer: str, identity: str) -> PeerRelay:
        found = self._relays.get((address, identity))
        if found is None:
            found = self._relays[(address, identity)] = PeerRelay(
                address, peer, identity, self.tls, self._dir / f"{len(self._relays)}.sock")
        return found

    def channel(self, address: str, peer: str, identity: str) -> grpc.aio.Channel:
        relay = self.relay(address, peer, identity)
        # :authority stays the peer's service name, as it was when grpc originated the TLS itself.
        return grpc.aio.insecure_channel(relay.target, options=[*self._options, ("grpc.default_authority", peer)])

    async def close(self) -> None:
        for relay in self._relays.values():
            await relay.close()
        self._relays.clear()
        shutil.rmtree(self._dir, ignore_errors=True)
