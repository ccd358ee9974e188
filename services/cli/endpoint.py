"""Where the local mesh is: `autoglm up` writes `<data_dir>/endpoint.json`; client commands read it
for their defaults (router address, TLS CA, billing's operator address)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import grpc

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
