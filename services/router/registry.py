"""The model registry: models → versions → replicas, traffic split in per-mille, canary state, audit log.

Each version may carry default sampling (`sampling_defaults.py`), kept when the version is registered
again without any. Rules: the first version registered for a model is its stable version with all the
traffic; later versions join with weight 0 until `set_split` or `promote`. `rollback` sends all
traffic back to the stable version and records an audit event. Everything is persisted in the router store (SQLite or
PostgreSQL, services/router/store); the models are held in memory, so routing never reads the database,
and a change made on another router is seen here within the store's `poll_s` (its `on_change` callbacks
run for it as for a local change).
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path

from services.common.errors import FailedPrecondition, InvalidInput, NotFound
from services.common.generation import Sampling
from services.router import sampling_defaults
from services.router.store import Row, Store, Tx, open_store
from services.router.store.migrations import REGISTRY

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$")
_ADDRESS = re.compile(r"^[A-Za-z0-9_.-]+:\d{1,5}$")


@dataclass(frozen=True)
class CanaryPolicy:
    max_error_permille: int = 50
    max_p99_s: float = 1.0
    window_s: float = 60.0
    min_requests: int = 20


@dataclass(frozen=True)
class VersionEntry:
    version: str
    replicas: tuple[str, ...]
    weight_permille: int = 0
    stable: bool = False
    canary: CanaryPolicy = field(default_factory=CanaryPolicy)
    # Sampling for the fields a request leaves unset (only the defaultable ones are set).
    default_sampling: Sampling = field(default_factory=Sampling)


@dataclass(frozen=True)
class ModelEntry:
    name: str
    versions: tuple[VersionEntry, ...] = ()
    fallback_models: tuple[str, ...] = ()
    context_window: int = 0

    def version(self, version: str) -> VersionEntry:
        for entry in self.versions:
            if entry.version == version:
                return entry
        raise NotFound(f"model {self.name!r} has no version {version!r}", field="model")

    @property
    def stable(self) -> VersionEntry:
        for entry in self.versions:
            if entry.stable:
                return entry
        return self.versions[0]

    @property
    def default_version(self) -> VersionEntry:
        return max(self.versions, key=lambda v: (v.weight_permille, v.stable))


AUDIT_PAGE_DEFAULT = 100
AUDIT_PAGE_MAX = 1000


@dataclass(frozen=True)
class AuditEvent:
    time: datetime
    actor: str
    action: str
    target: str
    details: dict[str, object]
    sequence: int = 0  # increases with every event


MAX_MODEL_SPEC = 256


def split_model(spec: str) -> tuple[str, str]:
    """"name@version" → (name, version); version is "" when not pinned."""
    if len(spec) > MAX_MODEL_SPEC:
        raise InvalidInput(f"model is at most {MAX_MODEL_SPEC} characters ('name' or 'name@version')", field="model")
    name, _, version = spec.partition("@")
    if not name:
        raise InvalidInput("model is required, e.g. 'smollm2-135m-instruct' or 'name@version'", field="model")
    return name, version


class Registry:
    def __init__(
        self,
        store: Store | Path,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        rng: random.Random | None = None,
    ) -> None:
        self._store = open_store(f"sqlite:///{store}") if isinstance(store, Path) else store
        self._store.migrate("registry", REGISTRY)
        self._clock = clock
        self._rng = rng or random.Random()
        self._models: dict[str, ModelEntry] = {}
        self._versions: dict[str, int] = {}
        self.on_change: list[Callable[[ModelEntry], None]] = []

        def load(tx: Tx) -> tuple[int, list[Row]]:
            counter = tx.one("SELECT version FROM router_changes WHERE domain = 'models'")
            return int(counter["version"]) if counter else 0, tx.all("SELECT name, body, version FROM models")

        since, rows = self._store.read(load)
        self._apply(rows)
        self._store.watch("models", "models", since, self._apply)

    # --- reads -----------------------------------------------------------------------------------
    def get(self, name: str) -> ModelEntry:
        model = self._models.get(name)
        if model is None:
            known = ", ".join(sorted(self._models)) or "none registered"
            raise NotFound(f"unknown model {name!r} (known: {known})", field="model")
        return model

    def models(self) -> list[ModelEntry]:
        return [self._models[name] for name in sorted(self._models)]

    def __contains__(self, name: object) -> bool:
        return name in self._models

    def pick_version(self, name: str, pinned: str = "") -> VersionEntry:
        """The pinned version, or one drawn by the traffic split."""
        model = self.get(name)
        if pinned:
            return model.version(pinned)
        weighted = [v for v in model.versions if v.weight_permille > 0]
        if not weighted:
            return model.stable
        draw = self._rng.randrange(sum(v.weight_permille for v in weighted))
        for entry in weighted:
            draw -= entry.weight_permille
            if draw < 0:
                return entry
        return weighted[-1]

    def audit_events(self, action: str = "", limit: int = -1, before: int | None = None) -> list[AuditEvent]:
        """Audit events, newest first: of `action` (all when empty), older than sequence `before`, at most
        `limit` (-1: all)."""
        sql, args = "SELECT * FROM audit WHERE 1 = 1", list[object]()
        if action:
            sql, args = sql + " AND action = ?", [action]
        if before is not None:
            sql, args = sql + " AND seq < ?", [*args, before]
        sql += " ORDER BY seq DESC"
        if limit >= 0:
            sql, args = sql + " LIMIT ?", [*args, limit]
        rows = self._store.read(lambda tx: tx.all(sql, args))
        return [
            AuditEvent(datetime.fromisoformat(r["time"]), r["actor"], r["action"], r["target"], json.loads(r["details"]),
                       r["seq"])
            for r in rows
        ]

    def audit_page(self, action: str, page_size: int, page_token: str) -> tuple[list[AuditEvent], str]:
        """One page of the audit log, newest first, and the token of the next page ("" when none)."""
        if page_size < 0:
            raise InvalidInput(f"page_size must be 0 (the default, {AUDIT_PAGE_DEFAULT}) or positive, got {page_size}",
                               field="page_size")
        size = min(page_size or AUDIT_PAGE_DEFAULT, AUDIT_PAGE_MAX)
        before: int | None = None
        if page_token:
            if not (page_token.isascii() and page_token.isdigit() and len(page_token) <= 18) or int(page_token) < 1:
                raise InvalidInput("page_token is not one this router handed out; pass a response's "
                                   "next_page_token unchanged, or none for the newest events", field="page_token")
            before = int(page_token)
        events = self.audit_events(action, size + 1, before)
        if len(events) > size:
            return events[:size], str(events[size - 1].sequence)
        return events, ""

    # --- writes ----------------------------------------------------------------------------------
    def register(
        self,
        name: str,
        version: str,
        replicas: tuple[str, ...],
        fallback_models: tuple[str, ...] = (),
        canary: CanaryPolicy | None = None,
        context_window: int = 0,
        actor: str = "admin",
        default_sampling: Sampling | None = None,
    ) -> ModelEntry:
        """Add a version, or update a registered one's replicas and canary policy (and its default sampling
        when given; None keeps the version's own, none for a new version)."""
        if not _NAME.match(name) or "@" in name:
            raise InvalidInput("model name must be 1-128 letters, digits, '_', '.', ':' or '-'", field="model")
        if not _NAME.match(version):
            raise InvalidInput("version must be 1-128 letters, digits, '_', '.', ':' or '-'", field="version")
        if not replicas:
            raise InvalidInput("at least one replica address (host:port) is required", field="replicas")
        for address in replicas:
            if not _ADDRESS.match(address):
                raise InvalidInput(f"replica address {address!r} is not host:port", field="replicas")
        if default_sampling is not None:
            sampling_defaults.check_defaults(default_sampling)
        new_defaults = default_sampling or Sampling()
        existing = self._models.get(name)
        policy = canary or CanaryPolicy()
        if existing is None:
            entry = VersionEntry(version, tuple(replicas), 1000, True, policy, new_defaults)
            model = ModelEntry(name, (entry,), tuple(fallback_models), context_window)
        else:
            versions = list(existing.versions)
            for index, current in enumerate(versions):
                if current.version == version:
                    versions[index] = replace(current, replicas=tuple(replicas), canary=policy,
                                              default_sampling=default_sampling or current.default_sampling)
                    break
            else:
                versions.append(VersionEntry(version, tuple(replicas), 0, False, policy, new_defaults))
            model = replace(
                existing,
                versions=tuple(versions),
                fallback_models=tuple(fallback_models) or existing.fallback_models,
                context_window=context_window or existing.context_window,
            )
        self._save(model)
        details: dict[str, object] = {"replicas": list(replicas)}
        if default_sampling is not None:
            details["default_sampling"] = sampling_defaults.as_dict(default_sampling)
        self.audit(actor, "model.register", f"model/{name}@{version}", details)
        return model

    def set_context_window(self, name: str, context_window: int) -> None:
        self._save(replace(self.get(name), context_window=context_window))

    def set_split(self, name: str, weights: dict[str, int], actor: str = "admin") -> ModelEntry:
        model = self.get(name)
        for version, weight in weights.items():
            model.version(version)
            if not 0 <= weight <= 1000:
                raise InvalidInput("each weight_permille must be within 0..1000", field="weights")
        if sum(weights.values()) != 1000:
            raise InvalidInput(
                f"weights must sum to 1000 per-mille, got {sum(weights.values())}", field="weights"
            )
        versions = tuple(replace(v, weight_permille=weights.get(v.version, 0)) for v in model.versions)
        model = replace(model, versions=versions)
        self._save(model)
        self.audit(actor, "model.split", f"model/{name}", {"weights": weights})
        return model

    def promote(self, name: str, version: str, actor: str = "admin") -> ModelEntry:
        model = self.get(name)
        model.version(version)
        versions = tuple(
            replace(v, weight_permille=1000 if v.version == version else 0, stable=v.version == version)
            for v in model.versions
        )
        model = replace(model, versions=versions)
        self._save(model)
        self.audit(actor, "model.promote", f"model/{name}@{version}", {})
        return model

    def rollback(self, name: str, reason: str, actor: str = "admin") -> ModelEntry:
        model = self.get(name)
        stable = model.stable
        if stable.weight_permille == 1000:
            raise FailedPrecondition(f"model {name!r} already sends all traffic to its stable version")
        previous = {v.version: v.weight_permille for v in model.versions}
        versions = tuple(replace(v, weight_permille=1000 if v is stable else 0) for v in model.versions)
        model = replace(model, versions=versions)
        self._save(model)
        self.audit(
            actor, "model.rollback", f"model/{name}", {"reason": reason, "to": stable.version, "previous": previous}
        )
        return model

    def _save(self, model: ModelEntry) -> None:
        body = _encode(model)

        def upsert(tx: Tx) -> int:
            version = tx.bump("models")
            tx.execute("INSERT INTO models (name, body, version) VALUES (?, ?, ?) ON CONFLICT(name)"
                       " DO UPDATE SET body = excluded.body, version = excluded.version", (model.name, body, version))
            return version

        self._remember(self._store.write(upsert), model)

    def _apply(self, rows: list[Row]) -> None:
        """Take models stored (here or by another router) into memory, unless memory holds a newer one."""
        for row in rows:
            self._remember(int(row["version"]), _decode(row["body"]))

    def _remember(self, version: int, model: ModelEntry) -> None:
        if version < self._versions.get(model.name, -1):
            return
        self._versions[model.name] = version
        self._models[model.name] = model
        for callback in self.on_change:
            callback(model)

    def audit(self, actor: str, action: str, target: str, details: dict[str, object]) -> None:
        """Append one event to the audit log (ListAuditEvents)."""
        row = (self._clock().isoformat(), actor, action, target, json.dumps(details, sort_keys=True))
        self._store.write(lambda tx: tx.execute(
            "INSERT INTO audit (time, actor, action, target, details) VALUES (?,?,?,?,?)", row))

    def close(self) -> None:
        self._store.close()


def _encode(model: ModelEntry) -> str:
    return json.dumps(
        {
            "name": model.name,
            "fallback_models": list(model.fallback_models),
            "context_window": model.context_window,
            "versions": [
                {
                    "version": v.version,
                    "replicas": list(v.replicas),
                    "weight_permille": v.weight_permille,
                    "stable": v.stable,
                    "canary": v.canary.__dict__,
                    "default_sampling": sampling_defaults.as_dict(v.default_sampling),
                }
                for v in model.versions
            ],
        }
    )


def _decode(text: str) -> ModelEntry:
    data = json.loads(text)
    versions = tuple(
        VersionEntry(
            v["version"], tuple(v["replicas"]), v["weight_permille"], v["stable"], CanaryPolicy(**v["canary"]),
            Sampling(**v.get("default_sampling", {})),
        )
        for v in data["versions"]
    )
    return ModelEntry(data["name"], versions, tuple(data["fallback_models"]), data["context_window"])
