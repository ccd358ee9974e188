"""Router settings: read once at the edge (flags, the `router:` section of the mesh file)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from services.common.config import ServerSettings

DEFAULT_PORT = 50051
BUNDLED_MODEL = "smollm2-135m-instruct"


@dataclass(frozen=True)
class RouterConfig:
    server: ServerSettings = field(default_factory=lambda: ServerSettings(port=DEFAULT_PORT))
    # host:port of each inference replica (or of its sidecar's outbound listener). At start, a model
    # with no registry entry is registered from these replicas' GetModelInfo.
    inference_targets: tuple[str, ...] = ()
    # host:port of billing (or of the sidecar's outbound listener).
    billing_target: str = ""
    # SQLite files, the key pepper and the admin token live here.
    data_dir: Path = Path(".autoglm/router")
    # Bearer token for AdminService; empty: read (or create on first start) `<data_dir>/admin_token`.
    admin_token: str = ""
    # JWT: an HS256 shared secret and/or a JWKS file with RS256/ES256 public keys; the tenant claim.
    jwt_hs256_secret: str = ""
    jwt_jwks_path: str = ""
    jwt_tenant_claim: str = "tenant"
    jwt_issuer: str = ""
    jwt_audience: str = ""
    # Response cache bounds.
    cache_max_entries: int = 10_000
    cache_max_bytes: int = 64 * 1024 * 1024
    cache_ttl_s: float = 3600.0
    # max_tokens when a request does not set it.
    default_max_tokens: int = 256
    # Seconds core/interactive traffic continues while billing is unreachable (usage spooled).
    billing_grace_s: float = 300.0
    billing_timeout_s: float = 3.0
    # Generations running at once through this router; beyond, waiters are admitted by traffic class.
    max_concurrent: int = 512
    # Replica health checks / load reports interval; a replica failing 3 checks in a row is ejected.
    health_interval_s: float = 1.0
    retry_max_attempts: int = 3
    # Batch jobs: items running at once router-wide, how often the runner looks at jobs and budgets,
    # and how long batch traffic waits for an unreachable billing (bounded by the call's deadline).
    batch_concurrency: int = 4
    batch_poll_s: float = 0.5
    batch_billing_wait_s: float = 300.0
    # Redis holding the per-key rate-limit buckets, shared by router replicas (redis://host:port/db,
    # rediss://, unix:///path.sock); empty: in-process buckets. Redis unreachable: requests pass (fail open).
    rate_limit_redis_url: str = ""
    # Requests per tenant whose generation may start while their budget hold is still on the way (only
    # for tenants billing last placed below every alert threshold; nothing is sent before the hold is
    # granted). 0: always wait for the hold first.
    early_starts_per_tenant: int = 8
    # The OpenAI-compatible HTTP API (services/router/http): its port (0: off), host (empty: the gRPC
    # host) and TLS certificate + key in PEM (empty: plaintext). Same process, event loop and gateway.
    http_port: int = 0
    http_host: str = ""
    http_tls_cert: str = ""
    http_tls_key: str = ""

    def __post_init__(self) -> None:
        if self.cache_max_entries < 0 or self.cache_max_bytes < 0 or self.cache_ttl_s < 0:
            raise ValueError("cache bounds must be >= 0")
        if self.default_max_tokens < 1:
            raise ValueError("default_max_tokens must be >= 1")
        if self.batch_concurrency < 1 or self.batch_poll_s <= 0:
            raise ValueError("batch_concurrency must be >= 1 and batch_poll_s > 0")
        if self.early_starts_per_tenant < 0:
            raise ValueError("early_starts_per_tenant must be >= 0")
        if self.max_concurrent < 1:
            raise ValueError("max_concurrent must be >= 1")
        if not 0 <= self.http_port <= 65535:
            raise ValueError(f"http_port must be 0..65535, got {self.http_port}")
        if bool(self.http_tls_cert) != bool(self.http_tls_key):
            raise ValueError("http_tls_cert and http_tls_key go together (both PEM files, or neither)")
