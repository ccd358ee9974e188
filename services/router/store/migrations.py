"""Versioned schema migrations of the router's tables, per domain, one list for both databases (types
differ only through {int} / {serial}).

Each migration runs once, in order, inside one transaction, and is recorded in `router_migrations`.
Version 1 of each domain is the schema routers had before migrations (`IF NOT EXISTS`, so an existing
SQLite file is adopted as it is). Add a new migration at the end of its domain; never edit a shipped one.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from services.router.store.base import TYPES, Migration, Step, Tx

CHANGES: Sequence[Migration] = (
    (1, "version counters of the cached domains",
     ("CREATE TABLE IF NOT EXISTS router_changes (domain TEXT PRIMARY KEY, version {int} NOT NULL)",)),
)


def _counter(domain: str) -> str:
    return f"INSERT INTO router_changes (domain, version) VALUES ('{domain}', 0) ON CONFLICT (domain) DO NOTHING"


KEYS: Sequence[Migration] = (
    (1, "api keys", (
        """CREATE TABLE IF NOT EXISTS api_keys (
            key_id TEXT PRIMARY KEY, secret_hash TEXT NOT NULL UNIQUE, prefix TEXT NOT NULL,
            tenant_id TEXT NOT NULL, name TEXT NOT NULL, allowed_models TEXT NOT NULL,
            requests_per_minute {int} NOT NULL, tokens_per_minute {int} NOT NULL, traffic_class {int} NOT NULL,
            create_time TEXT NOT NULL, revoke_time TEXT, expire_time TEXT)""",
        "CREATE INDEX IF NOT EXISTS api_keys_tenant ON api_keys(tenant_id)",
    )),
    (2, "versioned keys, followed by every router", (
        "ALTER TABLE api_keys ADD COLUMN version {int} NOT NULL DEFAULT 0",
        "CREATE INDEX api_keys_version ON api_keys(version)",
        _counter("keys"),
    )),
    (3, "which pepper the keys are hashed with", (
        "CREATE TABLE key_pepper (id {int} PRIMARY KEY, fingerprint TEXT NOT NULL)",
    )),
)

POLICIES: Sequence[Migration] = (
    (1, "policies", ("CREATE TABLE IF NOT EXISTS policies (tenant_id TEXT PRIMARY KEY, body TEXT NOT NULL)",)),
    (2, "versioned policies, followed by every router", (
        "ALTER TABLE policies ADD COLUMN version {int} NOT NULL DEFAULT 0",
        _counter("policies"),
    )),
)

def _versions_active(tx: Tx) -> None:
    """Every version stored before versions had a life serves as it did: ACTIVE."""
    for row in tx.all("SELECT name, body FROM models"):
        body = json.loads(row["body"])
        for version in body["versions"]:
            version.setdefault("state", "ACTIVE")
        tx.execute("UPDATE models SET body = ? WHERE name = ?", (json.dumps(body), row["name"]))


REGISTRY: Sequence[Migration] = (
    (1, "models and the audit log", (
        "CREATE TABLE IF NOT EXISTS models (name TEXT PRIMARY KEY, body TEXT NOT NULL)",
        """CREATE TABLE IF NOT EXISTS audit (seq {serial}, time TEXT, actor TEXT, action TEXT, target TEXT,
            details TEXT)""",
    )),
    (2, "versioned models, followed by every router", (
        "ALTER TABLE models ADD COLUMN version {int} NOT NULL DEFAULT 0",
        _counter("models"),
    )),
    (3, "model version states (the versions registered before are ACTIVE) and their history", (
        _versions_active,
        """CREATE TABLE model_version_history (seq {serial}, time TEXT NOT NULL, model TEXT NOT NULL,
            version TEXT NOT NULL, from_state TEXT NOT NULL, to_state TEXT NOT NULL, actor TEXT NOT NULL,
            reason TEXT NOT NULL)""",
        "CREATE INDEX model_version_history_model ON model_version_history(model, seq)",
    )),
)


def _turn_columns(tx: Tx) -> None:
    """A store from before retention gets `at_us` (its turns count as written now) and `size`."""
    columns = tx.columns("turns")
    if "at_us" not in columns:
        tx.execute("ALTER TABLE turns ADD COLUMN at_us {int} NOT NULL DEFAULT 0".format(**TYPES[tx.dialect]))
        tx.execute("UPDATE turns SET at_us = ?", (_now_us(),))
    if "size" not in columns:
        tx.execute("ALTER TABLE turns ADD COLUMN size {int} NOT NULL DEFAULT 0".format(**TYPES[tx.dialect]))
        tx.execute("UPDATE turns SET size = length(CAST(content AS BLOB))" if tx.dialect == "sqlite"
                   else "UPDATE turns SET size = octet_length(content)")


def _now_us() -> int:
    import time

    return int(time.time() * 1_000_000)


CONTEXTS: Sequence[Migration] = (
    (1, "conversation turns", (
        """CREATE TABLE IF NOT EXISTS turns (tenant_id TEXT, context_id TEXT, seq {serial}, role {int},
            content TEXT)""",
    )),
    (2, "turn time and size, for retention", (
        _turn_columns,
        "CREATE INDEX IF NOT EXISTS turns_ctx ON turns(tenant_id, context_id, seq)",
    )),
)

JOBS: Sequence[Migration] = (
    (1, "batch jobs and their items", (
        """CREATE TABLE IF NOT EXISTS jobs (
            job_id TEXT PRIMARY KEY, tenant_id TEXT NOT NULL, principal TEXT NOT NULL, model TEXT NOT NULL,
            state {int} NOT NULL, create_us {int} NOT NULL, deadline_us {int}, end_us {int},
            tags TEXT NOT NULL, idempotency_key TEXT NOT NULL, total {int} NOT NULL)""",
        "CREATE UNIQUE INDEX IF NOT EXISTS jobs_idempotency ON jobs (tenant_id, idempotency_key)"
        " WHERE idempotency_key != ''",
        "CREATE INDEX IF NOT EXISTS jobs_tenant ON jobs (tenant_id, create_us)",
        """CREATE TABLE IF NOT EXISTS items (
            job_id TEXT NOT NULL, idx {int} NOT NULL, custom_id TEXT NOT NULL, spec TEXT NOT NULL,
            state {int} NOT NULL DEFAULT 0, text TEXT NOT NULL DEFAULT '', finish {int} NOT NULL DEFAULT 0,
            prompt_tokens {int} NOT NULL DEFAULT 0, completion_tokens {int} NOT NULL DEFAULT 0,
            cost_micros {int} NOT NULL DEFAULT 0, currency TEXT NOT NULL DEFAULT '',
            error_code TEXT NOT NULL DEFAULT '', error_message TEXT NOT NULL DEFAULT '',
            PRIMARY KEY (job_id, idx))""",
        "CREATE INDEX IF NOT EXISTS items_pending ON items (job_id, state, idx)",
    )),
    (2, "item claims: the router running an item, until when its lease holds, and how often it was claimed", (
        "ALTER TABLE items ADD COLUMN claimed_by TEXT NOT NULL DEFAULT ''",
        "ALTER TABLE items ADD COLUMN lease_us {int} NOT NULL DEFAULT 0",
        "ALTER TABLE items ADD COLUMN attempts {int} NOT NULL DEFAULT 0",
        "CREATE INDEX items_claims ON items (claimed_by, state)",
    )),
)


WORKFLOWS: Sequence[Migration] = (
    (1, "workflows and their nodes", (
        """CREATE TABLE IF NOT EXISTS workflows (
            workflow_id TEXT PRIMARY KEY, tenant_id TEXT NOT NULL, principal TEXT NOT NULL, name TEXT NOT NULL,
            model TEXT NOT NULL, state {int} NOT NULL, traffic_class {int} NOT NULL, create_us {int} NOT NULL,
            deadline_us {int}, end_us {int}, tags TEXT NOT NULL, max_concurrency {int} NOT NULL)""",
        "CREATE INDEX IF NOT EXISTS workflows_tenant ON workflows (tenant_id, create_us)",
        "CREATE INDEX IF NOT EXISTS workflows_state ON workflows (state)",
        """CREATE TABLE IF NOT EXISTS workflow_nodes (
            workflow_id TEXT NOT NULL, node_id TEXT NOT NULL, position {int} NOT NULL, spec TEXT NOT NULL,
            state {int} NOT NULL, attempt {int} NOT NULL DEFAULT 1, runs {int} NOT NULL DEFAULT 0,
            not_before_us {int}, start_us {int}, end_us {int}, output TEXT NOT NULL DEFAULT '',
            fields TEXT NOT NULL DEFAULT '{{}}', prompt_tokens {int} NOT NULL DEFAULT 0,
            completion_tokens {int} NOT NULL DEFAULT 0, cost_micros {int} NOT NULL DEFAULT 0,
            currency TEXT NOT NULL DEFAULT '', error_code TEXT NOT NULL DEFAULT '',
            error_message TEXT NOT NULL DEFAULT '', PRIMARY KEY (workflow_id, node_id))""",
    )),
    (2, "which router runs a node, and until when its claim holds", (
        "ALTER TABLE workflow_nodes ADD COLUMN owner TEXT NOT NULL DEFAULT ''",
        "ALTER TABLE workflow_nodes ADD COLUMN lease_us {int}",
        "CREATE INDEX IF NOT EXISTS workflow_nodes_running ON workflow_nodes (state, lease_us)",
    )),
    (3, "what each attempt of a node delivered, as it was billed", (
        """CREATE TABLE IF NOT EXISTS workflow_attempts (
            workflow_id TEXT NOT NULL, node_id TEXT NOT NULL, event_id TEXT NOT NULL,
            prompt_tokens {int} NOT NULL, completion_tokens {int} NOT NULL, cost_micros {int} NOT NULL,
            currency TEXT NOT NULL, PRIMARY KEY (workflow_id, node_id, event_id))""",
    )),
)


def migrate(tx: Tx, domain: str, migrations: Sequence[Migration], now_us: int) -> list[int]:
    """Apply `domain`'s pending migrations inside the caller's transaction; returns the versions applied."""
    types = TYPES[tx.dialect]
    tx.execute(f"CREATE TABLE IF NOT EXISTS router_migrations (domain TEXT NOT NULL, version {types['int']} NOT NULL,"
               f" name TEXT NOT NULL, applied_us {types['int']} NOT NULL, PRIMARY KEY (domain, version))")
    applied = {int(r["version"]) for r in tx.all("SELECT version FROM router_migrations WHERE domain = ?", (domain,))}
    done = []
    for version, name, steps in migrations:
        if version in applied:
            continue
        for step in steps:
            _run(tx, step)
        tx.execute("INSERT INTO router_migrations (domain, version, name, applied_us) VALUES (?, ?, ?, ?)",
                   (domain, version, name, now_us))
        done.append(version)
    return done


def _run(tx: Tx, step: Step) -> None:
    if callable(step):
        step(tx)
    else:
        tx.execute(step.format(**TYPES[tx.dialect]))
