"""Billing settings: read once at the edge (flags and the `billing:` section of the mesh file)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from services.billing.operators import TOKEN_FILE, load_or_create_token
from services.common.config import ServerSettings

DEFAULT_PORT = 50061


def default_database(data_dir: Path) -> str:
    return f"sqlite:///{data_dir / 'billing.sqlite3'}"


@dataclass(frozen=True)
class BillingConfig:
    server: ServerSettings = field(default_factory=lambda: ServerSettings(port=DEFAULT_PORT))
    # `sqlite:///path/to/file` (default: billing.sqlite3 under the data dir) or `postgresql://...`.
    database: str = ""
    data_dir: Path = Path(".autoglm")
    # The one currency of this ledger (ISO 4217); prices and money budgets must use it.
    currency: str = "USD"
    # Seconds an unsettled hold lives when the caller names no TTL.
    hold_ttl_s: int = 300
    max_hold_ttl_s: int = 86_400
    # Router leases (services/billing/leases.py): a lease lives `lease_ttl_s` after its last refresh (never
    # past its budget's period); routers refresh about every `lease_refresh_s`. A refresh aims at the
    # router's spend rate x `lease_refresh_s`, between `lease_floor_permille` and `lease_cap_permille` of
    # the limit; the last `lease_edge_permille` of a limit is never leased (per-request Reserve only).
    lease_ttl_s: int = 60
    lease_refresh_s: int = 10
    lease_floor_permille: int = 10
    lease_cap_permille: int = 100
    lease_edge_permille: int = 50
    # A budget change waits this long at most for the routers watching leases (WatchLeases) to stop
    # admitting in-process for its scope before it commits (services/billing/lease_watch.py).
    lease_change_timeout_s: float = 1.0
    # Engine-side metering (services/billing/engine_usage.py): a replica's record of a finished sequence is
    # billed (source ENGINE) when no router event has come `engine_grace_s` after the latest of its end, its
    # arrival and the expiry of the router's leases open then; due records are reconciled every
    # `engine_reconcile_s`; settled records are kept `engine_retention_s`.
    engine_grace_s: float = 30.0
    engine_reconcile_s: float = 1.0
    engine_retention_s: int = 7 * 86_400
    # Alert thresholds (percent of the limit) for budgets that name none.
    warning_percent: int = 80
    critical_percent: int = 100
    emergency_percent: int = 120
    # Events stamped further than this in the future are refused (clock skew allowance).
    max_future_skew_s: int = 300
    # An event is charged the price its router quoted when that price was in force at some moment of the
    # last `quote_grace_s` before the event's end (routers refresh their price table every few seconds):
    # a price put in force at once then reaches every caller's quote and charge alike within this window.
    quote_grace_s: float = 15.0
    # Anomaly rule: more than `anomaly_max_requests` requests from one key within `anomaly_window_s`.
    anomaly_max_requests: int = 50
    anomaly_window_s: int = 10
    # An hour whose spend exceeds this multiple (per-mille) of the key's mean hourly spend is anomalous.
    anomaly_hourly_factor_permille: int = 3000
    # Webhook delivery of alerts: attempts with backoff; each attempt gets `webhook_connect_timeout_s` to
    # connect and `webhook_timeout_s` for the exchange, and reads at most `webhook_max_response_bytes`.
    webhook_attempts: int = 5
    webhook_backoff_s: float = 0.5
    webhook_timeout_s: float = 5.0
    webhook_connect_timeout_s: float = 3.0
    webhook_max_response_bytes: int = 65536
    # Webhooks go only to public addresses; these host names, addresses or networks (e.g. `127.0.0.1`,
    # `10.0.0.0/8`, `hooks.internal`) are allowed besides.
    webhook_allow: tuple[str, ...] = ()
    # Most events committed in one transaction (StreamUsage batching, group commit of unary calls).
    max_batch: int = 1024
    # SQLite `synchronous` setting: FULL (fsync before every acknowledged commit) or NORMAL.
    sqlite_synchronous: str = "FULL"
    # PostgreSQL connections of this process.
    postgres_pool_size: int = 8
    # Budgets, prices, reports, alerts and the audit log need an operator (services/billing/operators.py):
    # the bearer token `operator_token`, else the one in `operator_token_file` (e.g. a mounted secret,
    # shared by every billing replica), else `<data_dir>/billing_operator_token` (made on first start),
    # or, with `trust_forwarded_identity` (only where nothing but billing's sidecar reaches its port), a
    # mesh identity in `operator_identities` as the sidecar forwards it in `x-forwarded-client-cert`.
    operator_token: str = ""
    operator_token_file: str = ""
    operator_identities: tuple[str, ...] = ()
    trust_forwarded_identity: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "webhook_allow", tuple(str(entry) for entry in self.webhook_allow or ()))
        object.__setattr__(self, "operator_identities", tuple(str(i) for i in self.operator_identities or ()))
        if self.operator_token and len(self.operator_token) < 16:
            raise ValueError("operator_token must be at least 16 characters (or empty: a random one is made)")
        if any(not entry.strip() for entry in self.webhook_allow):
            raise ValueError("webhook_allow entries must be host names, addresses or networks, not empty")
        if self.webhook_timeout_s <= 0 or self.webhook_connect_timeout_s <= 0 or self.webhook_max_response_bytes < 1:
            raise ValueError("webhook_timeout_s and webhook_connect_timeout_s must be > 0 and "
                             "webhook_max_response_bytes >= 1")
        if not (0 < self.warning_percent <= self.critical_percent <= self.emergency_percent):
            raise ValueError("thresholds must satisfy 0 < warning <= critical <= emergency")
        if self.hold_ttl_s <= 0 or self.max_hold_ttl_s < self.hold_ttl_s:
            raise ValueError("hold_ttl_s must be > 0 and <= max_hold_ttl_s")
        if not 0 < self.lease_refresh_s < self.lease_ttl_s:
            raise ValueError("lease_refresh_s must be > 0 and below lease_ttl_s (a lease is refreshed before it "
                             "expires)")
        if not 0 <= self.lease_floor_permille <= self.lease_cap_permille <= 1000 or \
                not 0 <= self.lease_edge_permille <= 1000:
            raise ValueError("lease shares must satisfy 0 <= lease_floor_permille <= lease_cap_permille <= 1000 "
                             "and 0 <= lease_edge_permille <= 1000")
        if self.engine_grace_s < 0 or self.engine_reconcile_s <= 0 or self.engine_retention_s <= 0:
            raise ValueError("engine_grace_s must be >= 0, engine_reconcile_s and engine_retention_s > 0")
        if self.sqlite_synchronous.upper() not in ("FULL", "NORMAL", "EXTRA"):
            raise ValueError("sqlite_synchronous must be FULL, EXTRA or NORMAL")
        if len(self.currency) != 3 or not self.currency.isalpha() or not self.currency.isupper():
            raise ValueError(f"currency must be an ISO 4217 code like USD, got {self.currency!r}")
        if not (self.database == "" or self.database.startswith(("sqlite:///", "postgresql://", "postgres://"))):
            raise ValueError(f"database must be sqlite:///PATH or postgresql://..., got {self.database!r}")

    def operator_token_value(self) -> str:
        """The operator token: configured, read from `operator_token_file`, or made in the data dir."""
        if self.operator_token:
            return self.operator_token
        if self.operator_token_file:
            token = Path(self.operator_token_file).read_text().strip()
            if len(token) < 16:
                raise ValueError(f"{self.operator_token_file}: the operator token must be at least 16 characters")
            return token
        return load_or_create_token(self.data_dir / TOKEN_FILE)

    @property
    def dsn(self) -> str:
        return self.database or default_database(self.data_dir)
