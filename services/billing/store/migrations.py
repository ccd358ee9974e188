"""Versioned schema migrations, one list for both databases (types differ only where marked).

Each migration runs once, in order, inside a transaction, and is recorded in `schema_migrations`.
Add a new migration at the end; never edit one that has shipped.
"""

from __future__ import annotations

from collections.abc import Sequence

from services.billing import bursts
from services.billing.rollups import BACKFILL, DAYS_BACKFILL, ROLLING_TAGS, backfill
from services.billing.store.base import Tx

TYPES = {
    "sqlite": {"serial": "INTEGER PRIMARY KEY AUTOINCREMENT", "int": "INTEGER", "clustered": " WITHOUT ROWID",
               "rolling_tags": ROLLING_TAGS["sqlite"]},
    "postgres": {"serial": "BIGSERIAL PRIMARY KEY", "int": "BIGINT", "clustered": "",
                 "rolling_tags": ROLLING_TAGS["postgres"]},
}

MIGRATIONS: Sequence[tuple[int, str, Sequence[str]]] = (
    (1, "ledger, prices, budgets, holds, alerts, audit", (
        """CREATE TABLE prices (
            price_id TEXT PRIMARY KEY, model TEXT NOT NULL, model_version TEXT NOT NULL,
            input_micros {int} NOT NULL, output_micros {int} NOT NULL, cached_micros {int},
            currency TEXT NOT NULL, effective_us {int} NOT NULL, create_us {int} NOT NULL)""",
        "CREATE INDEX prices_model ON prices (model, model_version, effective_us)",
        """CREATE TABLE events (
            seq {serial}, event_id TEXT NOT NULL UNIQUE, tenant_id TEXT NOT NULL, api_key_id TEXT NOT NULL,
            model TEXT NOT NULL, model_version TEXT NOT NULL, tags_json TEXT NOT NULL,
            prompt_tokens {int} NOT NULL, completion_tokens {int} NOT NULL, cached {int} NOT NULL,
            request_id TEXT NOT NULL, trace_id TEXT NOT NULL, start_us {int} NOT NULL, end_us {int} NOT NULL,
            status {int} NOT NULL, traffic_class {int} NOT NULL, cost_micros {int} NOT NULL,
            currency TEXT NOT NULL, recorded_us {int} NOT NULL)""",
        "CREATE INDEX events_time ON events (end_us)",
        "CREATE INDEX events_tenant_time ON events (tenant_id, end_us)",
        """CREATE TABLE budgets (
            budget_id TEXT PRIMARY KEY, scope_kind {int} NOT NULL, tenant_id TEXT NOT NULL,
            api_key_id TEXT NOT NULL, tag_key TEXT NOT NULL, tag_value TEXT NOT NULL,
            period_kind {int} NOT NULL, rolling_days {int} NOT NULL, time_zone TEXT NOT NULL,
            amount_micros {int} NOT NULL, tokens {int} NOT NULL, enforcement {int} NOT NULL,
            warning_percent {int} NOT NULL, critical_percent {int} NOT NULL, emergency_percent {int} NOT NULL,
            auto_json TEXT, webhook_url TEXT NOT NULL, create_us {int} NOT NULL, update_us {int} NOT NULL,
            generation {int} NOT NULL)""",
        "CREATE INDEX budgets_tenant ON budgets (tenant_id)",
        """CREATE TABLE budget_usage (
            budget_id TEXT NOT NULL, bucket_us {int} NOT NULL, spent_micros {int} NOT NULL,
            spent_tokens {int} NOT NULL, limit_micros {int} NOT NULL, limit_tokens {int} NOT NULL,
            PRIMARY KEY (budget_id, bucket_us))""",
        """CREATE TABLE holds (
            hold_id TEXT PRIMARY KEY, request_id TEXT NOT NULL, tenant_id TEXT NOT NULL,
            amount_micros {int} NOT NULL, tokens {int} NOT NULL, expire_us {int} NOT NULL,
            state {int} NOT NULL, level {int} NOT NULL, create_us {int} NOT NULL)""",
        "CREATE UNIQUE INDEX holds_request ON holds (request_id) WHERE request_id <> ''",
        """CREATE TABLE hold_budgets (
            hold_id TEXT NOT NULL, budget_id TEXT NOT NULL, amount_micros {int} NOT NULL,
            tokens {int} NOT NULL, expire_us {int} NOT NULL, PRIMARY KEY (hold_id, budget_id))""",
        "CREATE INDEX hold_budgets_budget ON hold_budgets (budget_id, expire_us)",
        """CREATE TABLE alerts (
            seq {serial}, budget_id TEXT NOT NULL, tenant_id TEXT NOT NULL, scope_json TEXT NOT NULL,
            level {int} NOT NULL, period_start_us {int} NOT NULL, generation {int} NOT NULL,
            permille {int} NOT NULL, raise_us {int} NOT NULL,
            UNIQUE (budget_id, period_start_us, generation, level))""",
        """CREATE TABLE audit (
            seq {serial}, time_us {int} NOT NULL, actor TEXT NOT NULL, action TEXT NOT NULL,
            target TEXT NOT NULL, details_json TEXT NOT NULL)""",
        "CREATE INDEX audit_time ON audit (time_us)",
        # Bumped by every price or budget change, so each process reloads its in-memory catalogue.
        "CREATE TABLE catalog_version (id {int} PRIMARY KEY, version {int} NOT NULL)",
        "INSERT INTO catalog_version (id, version) VALUES (1, 0)",
    )),
    (2, "router leases", (
        # One row per lease: `granted` (cumulative room) and `used` (recorded against it) in the budget's
        # unit; it counts `granted - used` (at least 0) against its budget while open and not expired.
        # `mark` / `mark_us`: the router's consumption at its last refresh, for its spend rate.
        """CREATE TABLE leases (
            lease_id TEXT PRIMARY KEY, router_id TEXT NOT NULL, budget_id TEXT NOT NULL,
            in_tokens {int} NOT NULL, granted {int} NOT NULL, used {int} NOT NULL, expire_us {int} NOT NULL,
            state {int} NOT NULL, mark {int} NOT NULL, mark_us {int} NOT NULL, create_us {int} NOT NULL)""",
        "CREATE INDEX leases_budget ON leases (budget_id, expire_us)",
        "CREATE INDEX leases_router ON leases (router_id, budget_id, expire_us)",
    )),
    (3, "engine usage records", (
        # One row per finished sequence an inference replica reported (services/billing/engine_usage.py):
        # billed as an event (source ENGINE) once `due_us` passed with no router event for the request.
        """CREATE TABLE engine_records (
            request_id TEXT NOT NULL, replica_id TEXT NOT NULL, tenant_id TEXT NOT NULL, api_key_id TEXT NOT NULL,
            model TEXT NOT NULL, model_version TEXT NOT NULL, tags_json TEXT NOT NULL,
            prompt_tokens {int} NOT NULL, completion_tokens {int} NOT NULL, status {int} NOT NULL,
            traffic_class {int} NOT NULL, start_us {int} NOT NULL, end_us {int} NOT NULL, router_id TEXT NOT NULL,
            trace_id TEXT NOT NULL, received_us {int} NOT NULL, due_us {int} NOT NULL, state {int} NOT NULL,
            PRIMARY KEY (request_id, replica_id))""",
        "CREATE INDEX engine_records_due ON engine_records (state, due_us)",
        # Who metered each event: 1 the router (so are the events recorded before), 2 an engine record.
        "ALTER TABLE events ADD COLUMN source {int} NOT NULL DEFAULT 1",
    )),
    (4, "hourly usage rollups, backfilled from the events", (
        # One row per hour of end time and (tenant, key, model, version, status, tag set, source): what reports
        # read for whole hours (services/billing/rollups.py keeps it in step with `events`). One B-tree on
        # SQLite (WITHOUT ROWID) and no second index, so each event adds at most one index entry here.
        """CREATE TABLE usage_hours (
            hour_us {int} NOT NULL, tenant_id TEXT NOT NULL, api_key_id TEXT NOT NULL, model TEXT NOT NULL,
            model_version TEXT NOT NULL, status {int} NOT NULL, tags_json TEXT NOT NULL, source {int} NOT NULL,
            requests {int} NOT NULL, prompt_tokens {int} NOT NULL, completion_tokens {int} NOT NULL,
            cached_requests {int} NOT NULL, cost_micros {int} NOT NULL,
            PRIMARY KEY (hour_us, tenant_id, api_key_id, model, model_version, status, tags_json, source)){clustered}""",
        BACKFILL,
    )),
    (5, "usage rollups per report shape, backfilled from the events", (
        # The one hourly table of migration 4 had nearly a row per event at a busy deployment's spread of
        # keys and tags, so reports read about as many rows as events and each batch rewrote as many; these
        # hold one row per hour and report group instead (services/billing/rollups.py).
        "DROP TABLE usage_hours",
        """CREATE TABLE usage_hours_by_model (
            hour_us {int} NOT NULL, tenant_id TEXT NOT NULL, model TEXT NOT NULL, model_version TEXT NOT NULL,
            status {int} NOT NULL, source {int} NOT NULL, requests {int} NOT NULL, prompt_tokens {int} NOT NULL,
            completion_tokens {int} NOT NULL, cached_requests {int} NOT NULL, cost_micros {int} NOT NULL,
            PRIMARY KEY (hour_us, tenant_id, model, model_version, status, source)){clustered}""",
        """CREATE TABLE usage_hours_by_key (
            hour_us {int} NOT NULL, tenant_id TEXT NOT NULL, api_key_id TEXT NOT NULL, requests {int} NOT NULL,
            prompt_tokens {int} NOT NULL, completion_tokens {int} NOT NULL, cached_requests {int} NOT NULL,
            cost_micros {int} NOT NULL, PRIMARY KEY (hour_us, tenant_id, api_key_id)){clustered}""",
        """CREATE TABLE usage_hours_by_tag (
            hour_us {int} NOT NULL, tenant_id TEXT NOT NULL, tag_key TEXT NOT NULL, tag_value TEXT NOT NULL,
            requests {int} NOT NULL, prompt_tokens {int} NOT NULL, completion_tokens {int} NOT NULL,
            cached_requests {int} NOT NULL, cost_micros {int} NOT NULL,
            PRIMARY KEY (hour_us, tenant_id, tag_key, tag_value)){clustered}""",
        # Keyed by api key first: read for the few keys an anomaly rule flagged.
        """CREATE TABLE usage_key_groups (
            api_key_id TEXT NOT NULL, hour_us {int} NOT NULL, tenant_id TEXT NOT NULL, model TEXT NOT NULL,
            model_version TEXT NOT NULL, status {int} NOT NULL, tags_json TEXT NOT NULL, source {int} NOT NULL,
            PRIMARY KEY (api_key_id, hour_us, tenant_id, model, model_version, status, tags_json, source)){clustered}""",
        # The rollups hold exactly the events up to this seq; later ones are rolled in by `rollups.roll`.
        "CREATE TABLE rollup_mark (id {int} PRIMARY KEY, seq {int} NOT NULL)",
        *backfill("{rolling_tags}", days=False),
        "INSERT INTO rollup_mark (id, seq) SELECT 1, COALESCE(MAX(seq), 0) FROM events",
        # The time index carries each event's key and tenant too: the burst rule reads only the index.
        "CREATE INDEX events_time_key ON events (end_us, api_key_id, tenant_id)",
        "DROP INDEX events_time",
    )),
    (6, "burst starts per key and hour, backfilled from the events", (
        # Per hour, tenant and key: the latest first and earliest last request of the runs the burst rule
        # flags (services/billing/bursts.py), kept by `rollups.roll`; built for the rule in `usage_burst_rule`.
        """CREATE TABLE usage_key_bursts (
            hour_us {int} NOT NULL, tenant_id TEXT NOT NULL, api_key_id TEXT NOT NULL,
            latest_start_us {int} NOT NULL, first_end_us {int} NOT NULL,
            PRIMARY KEY (hour_us, tenant_id, api_key_id)){clustered}""",
        # The rule the table is for, and the last event it holds.
        "CREATE TABLE usage_burst_rule (id {int} PRIMARY KEY, max_requests {int} NOT NULL, window_s {int} NOT NULL,"
        " seq {int} NOT NULL)",
        f"INSERT INTO usage_burst_rule (id, max_requests, window_s, seq) SELECT 1, {bursts.DEFAULT_RULE[0]},"
        f" {bursts.DEFAULT_RULE[1]}, seq FROM rollup_mark WHERE id = 1",
        bursts.backfill(bursts.DEFAULT_RULE, "(SELECT seq FROM rollup_mark WHERE id = 1)"),
        "CREATE TABLE usage_key_tenants (api_key_id TEXT NOT NULL, tenant_id TEXT NOT NULL,"
        " PRIMARY KEY (api_key_id, tenant_id)){clustered}",
        bursts.KEY_TENANTS_BACKFILL,
    )),
    (7, "usage per key and day, backfilled from the hourly rollups", (
        # Per UTC day, tenant and key: how many of the day's hours had the key's events, and their requests
        # and cost, kept by `rollups.roll`: the spend rule's week of history in a row per key and day.
        """CREATE TABLE usage_days_by_key (
            day_us {int} NOT NULL, tenant_id TEXT NOT NULL, api_key_id TEXT NOT NULL, hours {int} NOT NULL,
            requests {int} NOT NULL, cost_micros {int} NOT NULL, PRIMARY KEY (day_us, tenant_id, api_key_id)){clustered}""",
        DAYS_BACKFILL,
    )),
)


def pending(applied: set[int]) -> list[tuple[int, str, Sequence[str]]]:
    return [m for m in MIGRATIONS if m[0] not in applied]


def migrate(tx: Tx, now_us: int) -> list[int]:
    """Apply every pending migration inside the caller's transaction; returns the versions applied."""
    tx.execute(
        f"CREATE TABLE IF NOT EXISTS schema_migrations (version {TYPES[tx.dialect]['int']} PRIMARY KEY,"
        f" name TEXT NOT NULL, applied_us {TYPES[tx.dialect]['int']} NOT NULL)"
    )
    applied = {int(r[0]) for r in tx.all("SELECT version FROM schema_migrations")}
    done = []
    for version, name, statements in pending(applied):
        for statement in statements:
            tx.execute(statement.format(**TYPES[tx.dialect]))
        tx.execute("INSERT INTO schema_migrations (version, name, applied_us) VALUES (?, ?, ?)", (version, name, now_us))
        done.append(version)
    return done
