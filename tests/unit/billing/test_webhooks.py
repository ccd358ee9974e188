"""Webhook targets and delivery against real sockets on 127.0.0.1: the allow-list, a DNS answer that changes
to a private address after the check (never posted), the checked address is the one connected to, and an
endpoint that trickles its answer is given up on within the configured time."""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from services.billing.webhooks import WebhookPolicy, WebhookSender
from services.common.errors import InvalidInput
from sidecar import certs

PUBLIC = "93.184.216.34"


class Endpoint:
    """A raw HTTP endpoint: records each request; answers with `reply` (or trickles bytes forever)."""

    def __init__(self, trickle: bool = False) -> None:
        self.trickle = trickle
        self.requests: list[bytes] = []
        self.server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(next((line.split(b":")[1] for line in head.split(b"\r\n")
                               if line.lower().startswith(b"content-length")), b"0"))
            self.requests.append(head + await reader.readexactly(length))
            if self.trickle:
                writer.write(b"HTTP/1.1 200 OK\r\nX-Slow: ")
                while True:
                    writer.write(b"a")
                    await writer.drain()
                    await asyncio.sleep(0.05)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
            await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def close(self) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()


@pytest.fixture
async def endpoint() -> AsyncIterator[Endpoint]:
    server = Endpoint()
    await server.start()
    try:
        yield server
    finally:
        await server.close()


def resolving(*answers: list[str]):  # type: ignore[no-untyped-def]
    """A resolver giving each answer in turn (the last one from then on)."""
    calls: list[str] = []

    async def resolve(host: str, port: int) -> list[str]:
        calls.append(host)
        return answers[min(len(calls), len(answers)) - 1]

    return resolve


async def test_private_targets_need_the_allow_list() -> None:
    closed = WebhookPolicy(resolver=resolving(["10.0.0.7"]))
    with pytest.raises(InvalidInput, match=r"resolves to 10\.0\.0\.7") as caught:
        await closed.check("https://hooks.corp/alert")
    assert caught.value.field == "budget.webhook_url"
    assert (await WebhookPolicy(resolver=resolving([PUBLIC])).check("https://hooks.example/a")).address == PUBLIC
    for allow in (["hooks.corp"], ["10.0.0.0/8"], ["10.0.0.7"]):
        assert (await WebhookPolicy(allow, resolver=resolving(["10.0.0.7"])).check("https://hooks.corp/a")).address
    mixed = WebhookPolicy(resolver=resolving([PUBLIC, "127.0.0.1"]))  # every address must pass
    with pytest.raises(InvalidInput, match=r"127\.0\.0\.1"):
        await mixed.check("http://both.example/")
    with pytest.raises(InvalidInput, match=r"::ffff:169\.254\.169\.254"):
        await WebhookPolicy().check("http://[::ffff:169.254.169.254]/")


async def test_a_host_that_does_not_resolve_in_time_is_refused() -> None:
    async def fail(host: str, port: int) -> list[str]:
        raise OSError("Name or service not known")

    async def hang(host: str, port: int) -> list[str]:
        await asyncio.Event().wait()
        return []

    with pytest.raises(InvalidInput, match="does not resolve"):
        await WebhookPolicy(resolver=fail).check("https://nowhere.example/")
    with pytest.raises(InvalidInput, match="does not resolve"):
        await asyncio.wait_for(WebhookPolicy(resolver=hang, resolve_timeout_s=0.1).check("https://slow.example/"), 10)


async def test_a_name_that_resolves_to_loopback_at_delivery_is_never_posted(endpoint: Endpoint) -> None:
    policy = WebhookPolicy(resolver=resolving([PUBLIC], ["127.0.0.1"]))
    url = f"http://rebind.example:{endpoint.port}/alerts"
    await policy.check(url)  # at budget creation: a public address
    sender = WebhookSender(policy, attempts=3, backoff_s=0.01)
    try:
        assert await sender.deliver(url, {"level": "WARNING"}) is False
    finally:
        await sender.close()
    assert endpoint.requests == []


async def test_delivery_connects_to_the_checked_address_with_the_url_host(endpoint: Endpoint) -> None:
    policy = WebhookPolicy(["hooks.test"], resolver=resolving(["127.0.0.1"]))
    sender = WebhookSender(policy, attempts=1)
    try:
        assert await sender.deliver(f"http://ops:s%40fe@hooks.test:{endpoint.port}/alerts?x=1", {"level": "WARNING"})
    finally:
        await sender.close()
    [request] = endpoint.requests
    assert request.startswith(b"POST /alerts?x=1 HTTP/1.1\r\n")
    assert f"host: hooks.test:{endpoint.port}\r\n".encode() in request.lower()
    assert request.endswith(b'{"level": "WARNING"}')
    assert b"\r\nAuthorization: Basic b3BzOnNAZmU=\r\n" in request  # ops:s@fe


async def test_an_endpoint_that_trickles_its_answer_is_given_up_on_in_time() -> None:
    slow = Endpoint(trickle=True)
    await slow.start()
    sender = WebhookSender(WebhookPolicy(["127.0.0.1"]), attempts=1, timeout_s=0.5, connect_timeout_s=0.5)
    began = time.monotonic()
    try:
        delivered = await asyncio.wait_for(sender.deliver(f"http://127.0.0.1:{slow.port}/", {}), 20)
    finally:
        await sender.close()
        await slow.close()
    assert delivered is False
    assert time.monotonic() - began < 5  # the whole exchange is bounded, not each read


async def test_https_is_verified_against_the_url_host_not_the_address(tmp_path: Path) -> None:
    ca = certs.make_ca()
    leaf = certs.issue(ca, "hooks.test")  # names hooks.test (and 127.0.0.1, which must not be what is checked)
    (tmp_path / "leaf.pem").write_bytes(leaf.cert_pem)
    (tmp_path / "leaf.key").write_bytes(leaf.key_pem)
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_tls.load_cert_chain(tmp_path / "leaf.pem", tmp_path / "leaf.key")
    endpoint = Endpoint()
    endpoint.server = await asyncio.start_server(endpoint._handle, "127.0.0.1", 0, ssl=server_tls)
    endpoint.port = endpoint.server.sockets[0].getsockname()[1]
    client_tls = ssl.create_default_context(cadata=ca.cert_pem.decode())
    policy = WebhookPolicy(["hooks.test", "other.test"], resolver=resolving(["127.0.0.1"]))
    sender = WebhookSender(policy, attempts=1, verify=client_tls)
    try:
        assert await sender.deliver(f"https://hooks.test:{endpoint.port}/a", {"n": 1}) is True
        assert await sender.deliver(f"https://other.test:{endpoint.port}/a", {"n": 2}) is False
    finally:
        await sender.close()
        await endpoint.close()
    assert len(endpoint.requests) == 1 and endpoint.requests[0].endswith(b'{"n": 1}')
