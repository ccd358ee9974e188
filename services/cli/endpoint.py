"""Where the local mesh is: `autoglm up` writes `<data_dir>/endpoint.json`; client commands read it
for their defaults (router address, TLS CA, billing's operator address). Billing's operator token comes
from --operator-token, $AUTOGLM_BILLING_TOKEN, or `<data_dir>/billing_operator_token` (billing makes it)."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from services.billing.operators import TOKEN_FILE

DEFAULT_DATA_DIR = Path(".autoglm")


@dataclass(frozen=True)
class Endpoint:
    router: str = "127.0.0.1:50051"
    tls: bool = False
    ca_cert: str = ""
    # Billing's own loopback port (operator tools on this machine; peers go through its sidecar).
    billing: str = "127.0.0.1:50061"

    def router_credentials(self) -> grpc.ChannelCredentials | None:
        if not self.tls:
            return None
        return grpc.ssl_channel_credentials(root_certificates=Path(self.ca_cert).read_bytes())


def router_target(data_dir: Path | str, router: str | None, ca_cert: str | None,
                  plaintext: bool) -> tuple[str, grpc.ChannelCredentials | None]:
    """The router address and channel credentials a client command uses: the local mesh's (TLS with its
    CA) unless told otherwise; `--ca-cert` for another router's TLS, `--plaintext` for none."""
    endpoint = load_endpoint(data_dir)
    address = router or endpoint.router
    if plaintext:
        return address, None
    if ca_cert:
        if not Path(ca_cert).is_file():
            raise SystemExit(f"--ca-cert {ca_cert}: no such file (the router's CA certificate, PEM)")
        return address, grpc.ssl_channel_credentials(root_certificates=Path(ca_cert).read_bytes())
    if router in (None, endpoint.router):
        return address, endpoint.router_credentials()
    return address, None


def load_endpoint(data_dir: Path | str = DEFAULT_DATA_DIR) -> Endpoint:
    path = Path(data_dir) / "endpoint.json"
    if not path.exists():
        return Endpoint()
    doc = json.loads(path.read_text())
    return Endpoint(router=doc.get("router", Endpoint.router), tls=bool(doc.get("tls")),
                    ca_cert=doc.get("ca_cert", ""), billing=doc.get("billing_operator") or doc.get("billing")
                    or Endpoint.billing)


def billing_token(data_dir: Path | str, explicit: str | None = None) -> str:
    """Billing's operator token: given, from $AUTOGLM_BILLING_TOKEN, or from the mesh's data dir ('' if none)."""
    if explicit:
        return explicit
    if os.environ.get("AUTOGLM_BILLING_TOKEN"):
        return os.environ["AUTOGLM_BILLING_TOKEN"]
    path = Path(data_dir) / TOKEN_FILE
    return path.read_text().strip() if path.exists() else ""


class _Bearer:
    """Adds `authorization: Bearer <token>` to a call's metadata."""

    def __init__(self, token: str) -> None:
        self._header = ("authorization", f"Bearer {token}")

    def _details(self, details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        metadata = [*(details.metadata or ()), self._header]
        return grpc.aio.ClientCallDetails(details.method, details.timeout, grpc.aio.Metadata(*metadata),
                                          details.credentials, details.wait_for_ready)


# grpc.aio files an interceptor under the first of the four kinds it is an instance of: one class per kind.
class _BearerUnaryUnary(_Bearer, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(self._details(details), request)


class _BearerUnaryStream(_Bearer, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(self._details(details), request)


class _BearerStreamUnary(_Bearer, grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(self, continuation: Any, details: Any, requests: Any) -> Any:
        return await continuation(self._details(details), requests)


class _BearerStreamStream(_Bearer, grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(self, continuation: Any, details: Any, requests: Any) -> Any:
        return await continuation(self._details(details), requests)


def operator_channel(address: str, token: str, options: Sequence[tuple[str, Any]] = ()) -> grpc.aio.Channel:
    """A plaintext channel to billing's operator (loopback) port sending the operator token on every call."""
    kinds = (_BearerUnaryUnary, _BearerUnaryStream, _BearerStreamUnary, _BearerStreamStream)
    interceptors: list[Any] = [kind(token) for kind in kinds] if token else []
    return grpc.aio.insecure_channel(address, options=list(options), interceptors=interceptors)
