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
    # Replica address → the address this router dials it through (its own sidecar's outbound listener for
    # that replica). Routers sharing a registry name replicas by their mesh addresses and each reaches them
    # through listeners of its own; unmapped addresses are dialled as they are.
    inference_dial: dict[str, str] = field(default_factory=dict)
    # host:port of billing (or of the sidecar's outbound listener).
    billing_target: str = ""
    # SQLite files, the key pepper and the admin token live here.
    data_dir: Path = Path(".autoglm/router")
    # Where keys, policies, the model registry and audit log, conversations and batch jobs live: empty, SQLite
    # files in data_dir (one router); `postgresql://user:pass@host/db` to share them between routers
    # (`sqlite:///PATH`, one file, shares them between router processes on one host). Each
    # router keeps keys, policies and the registry in memory and follows the other routers' changes, seen
    # within store_poll_s (at once on PostgreSQL, which notifies them; the poll catches up after an outage).
    database: str = ""
    store_poll_s: float = 0.25
    # The secret API keys are hashed with; empty: `<data_dir>/key_pepper` (made on first start). Routers
    # sharing a database must share it too (a router with another pepper refuses to start).
    key_pepper_path: str = ""
    # Bearer token for AdminService; empty: read it from admin_token_path, else read (or create on first
    # start) `<data_dir>/admin_token`.
    admin_token: str = ""
    # A file holding the admin token (a mounted Secret, say); it must exist: the router never creates it.
    admin_token_path: str = ""
    # JWT: an HS256 shared secret (at least 32 bytes) and/or a JWKS file with RS256/ES256 public keys
    # (re-read when it changes: rotate keys without a restart); the tenant claim. Tokens must carry `exp`;
    # `iss` / `aud` are required and checked when set here (recommended). Clock skew allowed: leeway.
    jwt_hs256_secret: str = ""
    jwt_jwks_path: str = ""
    jwt_tenant_claim: str = "tenant"
    jwt_issuer: str = ""
    jwt_audience: str = ""
    jwt_leeway_s: float = 30.0
    # Response cache bounds.
    cache_max_entries: int = 10_000
    cache_max_bytes: int = 64 * 1024 * 1024
    cache_ttl_s: float = 3600.0
    # max_tokens when a request does not set it.
    default_max_tokens: int = 256
    # Seconds core/interactive traffic continues while billing is unreachable (usage spooled), counted
    # from the outage's first transport failure; only for tenants billing last placed below CRITICAL.
    billing_grace_s: float = 300.0
    # An outage ends at the first call billing answers this many seconds after the outage's latest
    # transport failure (an answer sooner, billing flapping, does not restart the grace window).
    billing_recovery_s: float = 10.0
    billing_timeout_s: float = 3.0
    # Per-request Reserves on the way to billing from this router at once; more wait their turn (a burst
    # at a budget's edge, once the leases are used up, stays within billing's sidecar concurrency limit).
    billing_reserves_in_flight: int = 64
    # Admit requests against billing leases held by this router (no billing call per request while a
    # caller's leases cover its worst case; see services/router/leasebook.py), else per-request Reserve.
    billing_leases: bool = True
    # Generations running at once through this router; beyond, waiters are admitted by traffic class.
    max_concurrent: int = 512
    # Requests that may wait for one of those slots. When the queue is full a request of a higher class
    # takes the place of the newest waiter of the lowest class below it; the one left out (or a request
    # finding no lower waiter) gets RESOURCE_EXHAUSTED (QUEUE_FULL) with a retry delay of
    # queue_retry_after_s.
    max_queued: int = 1024
    queue_retry_after_s: float = 1.0
    # Size limits checked before any other work (services/router/input_limits.py): bytes of prompt text
    # (prompt or message contents) and bytes of a whole request (tags, stop sequences... included).
    max_prompt_bytes: int = 1024 * 1024
    max_request_bytes: int = 2 * 1024 * 1024
    # Stored `context_id` conversations (services/router/contexts.py): at most this many messages and
    # bytes of content kept per context (oldest exchanges dropped first), and a context idle this long
    # is deleted.
    context_max_messages: int = 200
    context_max_bytes: int = 1024 * 1024
    context_retention_s: float = 30 * 86400.0
    # Finished batch jobs (and their results) are deleted this long after they ended.
    job_retention_s: float = 7 * 86400.0
    # How often expired contexts and jobs are purged.
    retention_purge_interval_s: float = 3600.0
    # Replica health checks / load reports interval; a replica failing 3 checks in a row is ejected.
    health_interval_s: float = 1.0
    # Prefix affinity: a conversation (context_id) or prompts sharing their leading characters go to the
    # replica rendezvous hashing prefers for them (its prefix cache holds their blocks) unless its load
    # (queued + active sequences) exceeds the least-loaded replica's by more than this; -1: always the
    # least-loaded replica.
    affinity_load_margin: int = 4
    retry_max_attempts: int = 3
    # Batch jobs: items running at once router-wide, how often the runner looks at jobs and budgets,
    # and how long batch traffic waits for an unreachable billing (bounded by the call's deadline).
    batch_concurrency: int = 4
    batch_poll_s: float = 0.5
    batch_billing_wait_s: float = 300.0
    # Routers sharing router.database share the batch work: an item is claimed with a lease renewed every
    # batch_lease_s / 3 while it runs; the items of a router that died are taken over once it expired.
    batch_lease_s: float = 15.0
    # Redis holding the per-key rate-limit buckets, shared by router replicas (redis://host:port/db,
    # rediss://, unix:///path.sock); empty: in-process buckets. Redis unreachable: requests pass unchecked
    # (fail open, the default) or, with rate_limit_redis_fail_open false, are refused with UNAVAILABLE.
    rate_limit_redis_url: str = ""
    rate_limit_redis_fail_open: bool = True
    # Requests per tenant whose generation may start while their budget hold is still on the way (only
    # for tenants billing last placed below every alert threshold; nothing is sent before the hold is
    # granted). 0: always wait for the hold first.
    early_starts_per_tenant: int = 8
    # How often the price table the router quotes costs from is reloaded from billing. Billing charges a
    # quoted price while it was in force within its `quote_grace_s`: keep this well under that.
    price_refresh_s: float = 5.0
    # The OpenAI-compatible HTTP API (services/router/http): its port (0: off), host (empty: the gRPC
    # host) and TLS certificate + key in PEM (empty: plaintext). Same process, event loop and gateway.
    http_port: int = 0
    http_host: str = ""
    http_tls_cert: str = ""
    http_tls_key: str = ""
    # An HTTP request body not received in full this many seconds after the request began gets 408.
    http_body_timeout_s: float = 30.0
    # Workflows (services/router/workflows): nodes running at once router-wide, the cap of a workflow that
    # sets none, the most nodes one workflow may have, and how often the runner looks at workflows. Finished
    # workflows are deleted job_retention_s after they ended. A router's claim on a running node lasts
    # workflow_lease_s past its last extension (every third of it): a node of a router that died runs
    # again on another router sharing its database once the claim expired (at once when it restarts).
    workflow_concurrency: int = 8
    workflow_default_concurrency: int = 4
    workflow_max_nodes: int = 64
    workflow_poll_s: float = 0.5
    workflow_lease_s: float = 15.0
    # The operator console (services/router/http/console) under /console/ on the HTTP API's port: signed in
    # with the admin token (every page and change) or the operator-read token (every page, no change;
    # empty and no file: nobody signs in read-only), a signed session cookie valid console_session_s.
    console: bool = True
    operator_read_token: str = ""
    operator_read_token_file: str = ""
    console_session_s: int = 8 * 3600
    # Billing's operator token the console's Spend, Budgets and Audit pages call billing with; empty: read
    # from this file at each call (`python -m services.router --config` defaults it from the mesh file:
    # billing.operator_token / operator_token_file, else <mesh.data_dir>/billing_operator_token).
    billing_operator_token: str = ""
    billing_operator_token_file: str = ""

    def __post_init__(self) -> None:
        if self.cache_max_entries < 0 or self.cache_max_bytes < 0 or self.cache_ttl_s < 0:
            raise ValueError("cache bounds must be >= 0")
        if self.default_max_tokens < 1:
            raise ValueError("default_max_tokens must be >= 1")
        if self.batch_concurrency < 1 or self.batch_poll_s <= 0:
            raise ValueError("batch_concurrency must be >= 1 and batch_poll_s > 0")
        if not 1 <= self.batch_lease_s <= 3600:
            raise ValueError("batch_lease_s must be 1 to 3600 seconds")
        if self.price_refresh_s <= 0:
            raise ValueError("price_refresh_s must be > 0")
        if self.early_starts_per_tenant < 0:
            raise ValueError("early_starts_per_tenant must be >= 0")
        if self.billing_reserves_in_flight < 1:
            raise ValueError("billing_reserves_in_flight must be >= 1")
        if self.billing_grace_s < 0 or self.billing_recovery_s < 0:
            raise ValueError("billing_grace_s and billing_recovery_s must be >= 0")
        if self.affinity_load_margin < -1:
            raise ValueError("affinity_load_margin must be >= 0, or -1 to turn prefix affinity off")
        if self.max_concurrent < 1:
            raise ValueError("max_concurrent must be >= 1")
        if self.jwt_hs256_secret and len(self.jwt_hs256_secret.encode()) < 32:
            raise ValueError("jwt_hs256_secret must be at least 32 bytes (RFC 7518 3.2)")
        if not 0 <= self.jwt_leeway_s <= 300:
            raise ValueError("jwt_leeway_s must be 0 to 300 seconds")
        if self.max_queued < 0 or self.queue_retry_after_s <= 0:
            raise ValueError("max_queued must be >= 0 and queue_retry_after_s > 0")
        if self.max_prompt_bytes < 1 or self.max_request_bytes < 1:
            raise ValueError("max_prompt_bytes and max_request_bytes must be >= 1")
        if self.context_max_messages < 2 or self.context_max_bytes < 1:
            raise ValueError("context_max_messages must be >= 2 and context_max_bytes >= 1")
        if self.context_retention_s <= 0 or self.job_retention_s <= 0 or self.retention_purge_interval_s <= 0:
            raise ValueError("context_retention_s, job_retention_s and retention_purge_interval_s must be > 0")
        if self.database and not self.database.startswith(("postgresql://", "postgres://", "sqlite:///")):
            raise ValueError("router.database is a postgresql://... or sqlite:///PATH URL (leave it empty for the "
                             "SQLite files in data_dir)")
        if not 0 < self.store_poll_s <= 1:
            raise ValueError("store_poll_s must be > 0 and at most 1 (changes reach every router within it)")
        if not 0 <= self.http_port <= 65535:
            raise ValueError(f"http_port must be 0..65535, got {self.http_port}")
        if self.http_body_timeout_s <= 0:
            raise ValueError(f"http_body_timeout_s must be > 0, got {self.http_body_timeout_s}")
        if bool(self.http_tls_cert) != bool(self.http_tls_key):
            raise ValueError("http_tls_cert and http_tls_key go together (both PEM files, or neither)")
        if min(self.workflow_concurrency, self.workflow_default_concurrency, self.workflow_max_nodes) < 1 \
                or self.workflow_poll_s <= 0 or self.workflow_lease_s <= 0:
            raise ValueError("workflow_concurrency, workflow_default_concurrency and workflow_max_nodes must be >= 1 "
                             "and workflow_poll_s and workflow_lease_s > 0")
        if not 60 <= self.console_session_s <= 7 * 86400:
            raise ValueError(f"console_session_s must be 60 to 604800 seconds, got {self.console_session_s}")
        if self.operator_read_token and len(self.operator_read_token) < 16:
            raise ValueError("operator_read_token must be at least 16 characters")
