"""Webhook delivery of budget alerts: JSON POST, retried with exponential backoff (and jitter) on failure.

Only `http://` and `https://` URLs are accepted, and only to public addresses: a host that resolves to a
loopback, private, link-local, shared, reserved, multicast or unspecified address is refused unless
billing's `webhook_allow` names it (a host name, an address or a network such as `10.0.0.0/8`). The
check runs when a budget is created or changed (INVALID_ARGUMENT naming `budget.webhook_url`) and again
at every delivery, against the addresses the name resolves to then; the connection goes to the address
that passed the check (a DNS answer that changes in between cannot redirect it), with the URL's host
name for `Host` and TLS verification. Redirects are not followed and proxies from the environment are
not used. Each attempt is bounded: `connect_timeout_s` to connect, `timeout_s` for the whole exchange,
and at most `max_response_bytes` of the answer are read.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import random
import socket
import ssl
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

import httpx
import structlog

from services.common.errors import InvalidInput

log = structlog.get_logger(__name__)

IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
# host, port -> the addresses the host resolves to (a test can stand in for DNS).
Resolver = Callable[[str, int], Awaitable[list[str]]]
MAX_URL_LENGTH = 2048


async def system_resolver(host: str, port: int) -> list[str]:
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def _is_public(address: IpAddress) -> bool:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_global and not address.is_multicast


@dataclass(frozen=True)
class WebhookTarget:
    """A checked URL: where to connect (an address that passed the check) and what to send as Host/SNI."""

    url: str
    scheme: str
    host: str
    port: int
    address: str

    @property
    def pinned_url(self) -> str:
        """The URL with the checked address in place of the host name."""
        parts = urlsplit(self.url)
        literal = f"[{self.address}]" if ":" in self.address else self.address
        return urlunsplit((parts.scheme, f"{literal}:{self.port}", parts.path or "/", parts.query, ""))

    @property
    def host_header(self) -> str:
        default = 443 if self.scheme == "https" else 80
        name = f"[{self.host}]" if ":" in self.host else self.host
        return name if self.port == default else f"{name}:{self.port}"


class WebhookPolicy:
    """Which webhook URLs billing may post to (see the module docstring)."""

    def __init__(self, allow: Sequence[str] = (), resolver: Resolver = system_resolver,
                 resolve_timeout_s: float = 5.0) -> None:
        self._hosts: set[str] = set()
        self._networks: list[IpNetwork] = []
        for entry in allow:
            try:
                self._networks.append(ipaddress.ip_network(entry, strict=False))
            except ValueError:
                self._hosts.add(entry.lower().rstrip("."))
        self._resolver = resolver
        self._resolve_timeout_s = resolve_timeout_s

    @staticmethod
    def parse(url: str, field: str = "budget.webhook_url") -> tuple[str, str, int]:
        """(scheme, host, port) of a well-formed http(s) URL; InvalidInput naming `field` otherwise."""
        if len(url) > MAX_URL_LENGTH:
            raise InvalidInput(f"{field} is longer than {MAX_URL_LENGTH} characters", field=field)
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError as exc:
            raise InvalidInput(f"{field} is not a valid URL: {exc}", field=field) from exc
        if parts.scheme not in ("http", "https"):
            raise InvalidInput(f"{field} must be an http:// or https:// URL", field=field)
        host = (parts.hostname or "").rstrip(".")
        if not host:
            raise InvalidInput(f"{field} has no host", field=field)
        return parts.scheme, host, port or (443 if parts.scheme == "https" else 80)

    async def check(self, url: str, field: str = "budget.webhook_url") -> WebhookTarget:
        """The URL's target if every address its host resolves to may be posted to; InvalidInput otherwise."""
        scheme, host, port = self.parse(url, field)
        try:
            literal: IpAddress | None = ipaddress.ip_address(host)
        except ValueError:
            literal = None
        if literal is not None:
            addresses = [str(literal)]
        else:
            try:
                async with asyncio.timeout(self._resolve_timeout_s):
                    addresses = await self._resolver(host, port)
            except (OSError, UnicodeError, TimeoutError) as exc:
                raise InvalidInput(f"{field} host {host[:100]!r} does not resolve", field=field) from exc
            if not addresses:
                raise InvalidInput(f"{field} host {host[:100]!r} does not resolve", field=field)
        if host.lower() not in self._hosts:
            for text in addresses:
                address = ipaddress.ip_address(text.split("%", 1)[0])
                if not _is_public(address) and not any(address in net for net in self._networks):
                    raise InvalidInput(
                        f"{field} host {host[:100]!r} resolves to {address}, a loopback, private, link-local or "
                        "otherwise non-public address; billing's webhook_allow setting must name it to allow "
                        "that", field=field)
        return WebhookTarget(url=url, scheme=scheme, host=host, port=port, address=addresses[0])


class WebhookSender:
    def __init__(self, policy: WebhookPolicy | None = None, attempts: int = 5, backoff_s: float = 0.5,
                 timeout_s: float = 5.0, connect_timeout_s: float = 3.0, max_response_bytes: int = 65536,
                 verify: ssl.SSLContext | bool = True) -> None:
        self.policy = policy or WebhookPolicy()
        self.attempts = attempts
        self.backoff_s = backoff_s
        self.timeout_s = timeout_s
        self.connect_timeout_s = connect_timeout_s
        self.max_response_bytes = max_response_bytes
        self._tasks: set[asyncio.Task[bool]] = set()
        self._client = httpx.AsyncClient(
            timeout=httpx.Timeout(timeout_s, connect=connect_timeout_s), follow_redirects=False, trust_env=False,
            verify=verify, limits=httpx.Limits(max_connections=32, max_keepalive_connections=0))

    def send(self, url: str, payload: dict[str, Any]) -> asyncio.Task[bool]:
        task = asyncio.create_task(self.deliver(url, payload))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def deliver(self, url: str, payload: dict[str, Any]) -> bool:
        body = json.dumps(payload, sort_keys=True).encode()
        delay = self.backoff_s
        for attempt in range(1, self.attempts + 1):
            try:
                target = await self.policy.check(url, field="webhook_url")
            except InvalidInput as refused:  # the name resolves elsewhere now: never posted
                log.warning("webhook_refused", url=url, attempt=attempt, error=refused.message)
                return False
            try:
                async with asyncio.timeout(self.connect_timeout_s + self.timeout_s):
                    status = await self._post(target, body)
                if 200 <= status < 300:
                    log.info("webhook_delivered", url=url, attempt=attempt)
                    return True
                error = f"HTTP {status}"
            except (TimeoutError, httpx.HTTPError, OSError) as exc:
                error = f"{type(exc).__name__}: {exc}"[:300]
            log.warning("webhook_failed", url=url, attempt=attempt, error=error)
            if attempt < self.attempts:
                await asyncio.sleep(delay * (1 + random.random() / 4))
                delay *= 2
        return False

    async def _post(self, target: WebhookTarget, body: bytes) -> int:
        headers = {"Host": target.host_header, "Content-Type": "application/json"}
        extensions = {"sni_hostname": target.host} if target.scheme == "https" else {}
        parts = urlsplit(target.url)  # credentials in the URL become basic auth (the pinned URL has none)
        auth = (unquote(parts.username), unquote(parts.password or "")) if parts.username else None
        async with self._client.stream("POST", target.pinned_url, content=body, headers=headers, auth=auth,
                                       extensions=extensions) as response:
            read = 0
            async for chunk in response.aiter_raw():  # the answer is not used: read a bounded part of it
                read += len(chunk)
                if read >= self.max_response_bytes:
                    break
            return response.status_code

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._client.aclose()
