"""The model registry: models → versions → replicas, traffic split in per-mille, canary state, audit log.

Each version may carry default sampling (`sampling_defaults.py`), kept when the version is registered
again without any. Rules: the first version registered for a model is its stable version with all the
traffic; later versions join with weight 0 until `set_split` or `promote`. `rollback` sends all
traffic back to the stable version and records an audit event.

Each version has a state (`lifecycle.py`: DRAFT, PENDING_APPROVAL, ACTIVE, DEPRECATED, RETIRED), ACTIVE
unless registered otherwise: only ACTIVE versions take a split or are promoted, a version leaving ACTIVE
gives its traffic to the stable version, and a rolled-back canary goes back to PENDING_APPROVAL. Every
change reads the stored model and writes it back in one transaction holding the model's lock (a
PostgreSQL advisory lock; SQLite's write lock), with its audit event and history rows: routers sharing a
store never overwrite each other's changes, and a canary several routers see failing is rolled back
once, audited once. Everything is persisted in the router store (SQLite or
PostgreSQL, services/router/store); the models are held in memory, so routing never reads the database,
and a change made on another router is seen here within the store's `poll_s` (its `on_change` callbacks
run for it as for a local change). Callers on the event loop (AdminService, the canary monitor) use the
`a`-prefixed twin of each operation: its transaction runs on a worker thread, so a database that is slow
or locked holds up that call only, and memory is updated back on the loop as for the plain operation.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from services.common.errors import FailedPrecondition, InvalidInput, NotFound
from services.common.generation import Sampling
from services.router import lifecycle, sampling_defaults
from services.router.lifecycle import StateChange, VersionState
from services.router.store import Row, Store, Tx, open_store
from services.router.store.migrations import REGISTRY

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$")
_ADDRESS = re.compile(r"^[A-Za-z0-9_.-]+:\d{1,5}$")
REGISTRY_LOCK = 0x6D6F64  # PostgreSQL advisory lock space of model changes (second key: the model's name)
T = TypeVar("T")
# A registry change: (the stored model or None, its tx) -> (the model to store or None, the result).
Change = Callable[[Any, Tx], tuple["ModelEntry | None", T]]


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
    # Where the version is in its life (services/router/lifecycle.py), and since when (None: not recorded).
    state: VersionState = VersionState.ACTIVE
    state_time: datetime | None = None


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
        """The pinned version (ACTIVE or DEPRECATED), or an ACTIVE one drawn by the traffic split; raises
        FailedPrecondition naming the state of a version that may not serve the request."""
        model = self.get(name)
        if pinned:
            entry = model.version(pinned)
            lifecycle.refuse_unserved(f"{name}@{pinned}", entry.state, pinned=True)
            return entry
        weighted = [v for v in model.versions if v.weight_permille > 0 and v.state in lifecycle.SPLITTABLE]
        if not weighted:
            stable = model.stable
            lifecycle.refuse_unserved(f"{name}@{stable.version}", stable.state, pinned=False)
            return stable
        draw = self._rng.randrange(sum(v.weight_permille for v in weighted))
        for entry in weighted:
            draw -= entry.weight_permille
            if draw < 0:
                return entry
        return weighted[-1]

    def audit_events(self, action: str = "", limit: int = -1, before: int | None = None) -> list[AuditEvent]:
        """Audit events, newest first: of `action` (all when empty), older than sequence `before`, at most
        `limit` (-1: all)."""
        return _audit_of(self._store.read(_audit_rows(action, limit, before)))

    async def aaudit_events(self, action: str = "", limit: int = -1, before: int | None = None) -> list[AuditEvent]:
        """`audit_events`, read on a worker thread."""
        return _audit_of(await self._store.aread(_audit_rows(action, limit, before)))

    def audit_page(self, action: str, page_size: int, page_token: str) -> tuple[list[AuditEvent], str]:
        """One page of the audit log, newest first, and the token of the next page ("" when none)."""
        size, before = _page(page_size, page_token)
        return _paged(self.audit_events(action, size + 1, before), size)

    async def aaudit_page(self, action: str, page_size: int, page_token: str) -> tuple[list[AuditEvent], str]:
        """`audit_page`, read on a worker thread."""
        size, before = _page(page_size, page_token)
        return _paged(await self.aaudit_events(action, size + 1, before), size)

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
        initial_state: VersionState | None = None,
    ) -> ModelEntry:
        """Add a version, or update a registered one's replicas and canary policy (and its default sampling
        when given; None keeps the version's own, none for a new version). A new version starts in
        `initial_state` (None: ACTIVE, as versions always did); a registered one keeps its state."""
        return self._change(name, self._registration(name, version, replicas, fallback_models, canary,
                                                     context_window, actor, default_sampling, initial_state),
                            must_exist=False)

    async def aregister(
        self,
        name: str,
        version: str,
        replicas: tuple[str, ...],
        fallback_models: tuple[str, ...] = (),
        canary: CanaryPolicy | None = None,
        context_window: int = 0,
        actor: str = "admin",
        default_sampling: Sampling | None = None,
        initial_state: VersionState | None = None,
    ) -> ModelEntry:
        """`register`, written on a worker thread."""
        return await self._achange(name, self._registration(name, version, replicas, fallback_models, canary,
                                                            context_window, actor, default_sampling, initial_state),
                                   must_exist=False)

    def _registration(
        self, name: str, version: str, replicas: tuple[str, ...], fallback_models: tuple[str, ...],
        canary: CanaryPolicy | None, context_window: int, actor: str, default_sampling: Sampling | None,
        initial_state: VersionState | None,
    ) -> Change[ModelEntry]:
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
        if initial_state is not None:
            lifecycle.check_initial(initial_state)
        new_defaults = default_sampling or Sampling()
        policy = canary or CanaryPolicy()
        now = self._clock()

        def change(existing: ModelEntry | None, tx: Tx) -> tuple[ModelEntry, ModelEntry]:
            state = initial_state or VersionState.ACTIVE
            if existing is None:
                entry = VersionEntry(version, tuple(replicas), 1000 if state is VersionState.ACTIVE else 0, True,
                                     policy, new_defaults, state, now)
                model = ModelEntry(name, (entry,), tuple(fallback_models), context_window)
            else:
                versions = list(existing.versions)
                for index, current in enumerate(versions):
                    if current.version == version:
                        if initial_state is not None and initial_state is not current.state:
                            raise FailedPrecondition(
                                f"version {name}@{version} is already registered and {current.state.name}; "
                                "registering it again keeps its state (move it with SetVersionState)",
                                field="initial_state")
                        state = current.state
                        versions[index] = replace(current, replicas=tuple(replicas), canary=policy,
                                                  default_sampling=default_sampling or current.default_sampling)
                        break
                else:
                    versions.append(VersionEntry(version, tuple(replicas), 0, False, policy, new_defaults,
                                                 state, now))
                    if state is VersionState.ACTIVE:
                        versions = list(_enter_active(tuple(versions), version))
                model = replace(
                    existing,
                    versions=tuple(versions),
                    fallback_models=tuple(fallback_models) or existing.fallback_models,
                    context_window=context_window or existing.context_window,
                )
            details: dict[str, object] = {"replicas": list(replicas), "state": state.name}
            if default_sampling is not None:
                details["default_sampling"] = sampling_defaults.as_dict(default_sampling)
            if existing is None or all(v.version != version for v in existing.versions):
                self._history(tx, name, version, None, state, actor, "registered")
            self._audit(tx, actor, "model.register", f"model/{name}@{version}", details)
            return model, model

        return change

    def set_context_window(self, name: str, context_window: int) -> None:
        self._change(name, lambda model, tx: (replace(model, context_window=context_window), None))

    def set_split(self, name: str, weights: dict[str, int], actor: str = "admin") -> ModelEntry:
        return self._change(name, self._split(name, weights, actor))

    async def aset_split(self, name: str, weights: dict[str, int], actor: str = "admin") -> ModelEntry:
        """`set_split`, written on a worker thread."""
        return await self._achange(name, self._split(name, weights, actor))

    def _split(self, name: str, weights: dict[str, int], actor: str) -> Change[ModelEntry]:
        def change(model: ModelEntry, tx: Tx) -> tuple[ModelEntry, ModelEntry]:
            for version, weight in weights.items():
                entry = model.version(version)
                if entry.state not in lifecycle.SPLITTABLE:
                    raise FailedPrecondition(
                        f"version {name}@{version} is {entry.state.name}: only ACTIVE versions take a traffic "
                        "split (move it to ACTIVE with SetVersionState first)", field="weights")
                if not 0 <= weight <= 1000:
                    raise InvalidInput("each weight_permille must be within 0..1000", field="weights")
            if sum(weights.values()) != 1000:
                raise InvalidInput(
                    f"weights must sum to 1000 per-mille, got {sum(weights.values())}", field="weights"
                )
            versions = tuple(replace(v, weight_permille=weights.get(v.version, 0)) for v in model.versions)
            self._audit(tx, actor, "model.split", f"model/{name}", {"weights": weights})
            changed = replace(model, versions=versions)
            return changed, changed

        return change

    def promote(self, name: str, version: str, actor: str = "admin") -> ModelEntry:
        return self._change(name, self._promotion(name, version, actor))

    async def apromote(self, name: str, version: str, actor: str = "admin") -> ModelEntry:
        """`promote`, written on a worker thread."""
        return await self._achange(name, self._promotion(name, version, actor))

    def _promotion(self, name: str, version: str, actor: str) -> Change[ModelEntry]:
        def change(model: ModelEntry, tx: Tx) -> tuple[ModelEntry, ModelEntry]:
            entry = model.version(version)
            if entry.state is not VersionState.ACTIVE:
                raise FailedPrecondition(f"version {name}@{version} is {entry.state.name}: only an ACTIVE version "
                                         "is promoted (move it to ACTIVE with SetVersionState first)",
                                         field="version")
            versions = tuple(
                replace(v, weight_permille=1000 if v.version == version else 0, stable=v.version == version)
                for v in model.versions
            )
            self._audit(tx, actor, "model.promote", f"model/{name}@{version}", {})
            changed = replace(model, versions=versions)
            return changed, changed

        return change

    def rollback(self, name: str, reason: str, actor: str = "admin") -> ModelEntry:
        """All traffic back to the stable version; each canary that had traffic goes back to
        PENDING_APPROVAL with `reason`. One audit event."""
        return self._change(name, self._rollback(name, reason, actor))

    async def arollback(self, name: str, reason: str, actor: str = "admin") -> ModelEntry:
        """`rollback`, written on a worker thread."""
        return await self._achange(name, self._rollback(name, reason, actor))

    def _rollback(self, name: str, reason: str, actor: str) -> Change[ModelEntry]:
        def change(model: ModelEntry, tx: Tx) -> tuple[ModelEntry, ModelEntry]:
            stable = model.stable
            if stable.weight_permille == 1000:
                raise FailedPrecondition(f"model {name!r} already sends all traffic to its stable version")
            changed = self._roll_back(tx, model, [v.version for v in model.versions
                                                  if v.weight_permille and not v.stable], reason, actor)
            return changed, changed

        return change

    def rollback_canary(self, name: str, version: str, reason: str, actor: str = "router.canary") -> bool:
        """Roll back one failing canary, decided once however many routers ask at the same time: in the
        store's transaction (locked per model), only while the version is still an ACTIVE canary with
        traffic. True when this call rolled it back (and wrote the one audit event)."""
        return self._change(name, self._canary_rollback(version, reason, actor))

    async def arollback_canary(self, name: str, version: str, reason: str, actor: str = "router.canary") -> bool:
        """`rollback_canary`, decided on a worker thread (the request that found the canary failing waits for
        it; the event loop does not)."""
        return await self._achange(name, self._canary_rollback(version, reason, actor))

    def _canary_rollback(self, version: str, reason: str, actor: str) -> Change[bool]:
        def change(model: ModelEntry, tx: Tx) -> tuple[ModelEntry | None, bool]:
            entry = next((v for v in model.versions if v.version == version), None)
            if entry is None or entry.stable or not entry.weight_permille or entry.state is not VersionState.ACTIVE:
                return None, False  # another router (or an operator) got there first
            return self._roll_back(tx, model, [version], reason, actor), True

        return change

    def set_state(self, name: str, version: str, state: VersionState, actor: str, reason: str) -> ModelEntry:
        """Move a version through its life (services/router/lifecycle.py): audited with who and why."""
        return self._change(name, self._state_move(name, version, state, actor, reason))

    async def aset_state(self, name: str, version: str, state: VersionState, actor: str, reason: str) -> ModelEntry:
        """`set_state`, written on a worker thread."""
        return await self._achange(name, self._state_move(name, version, state, actor, reason))

    def _state_move(self, name: str, version: str, state: VersionState, actor: str, reason: str
                    ) -> Change[ModelEntry]:
        lifecycle.check_operator(actor, reason)

        def change(model: ModelEntry, tx: Tx) -> tuple[ModelEntry, ModelEntry]:
            entry = model.version(version)
            target = f"{name}@{version}"
            lifecycle.check_move(target, entry.state, state)
            versions = model.versions
            if entry.state is VersionState.ACTIVE:
                versions = _leave_active(name, versions, version)
            versions = tuple(replace(v, state=state, state_time=self._clock()) if v.version == version else v
                             for v in versions)
            if state is VersionState.ACTIVE:
                versions = _enter_active(versions, version)
            self._history(tx, name, version, entry.state, state, actor, reason)
            details: dict[str, object] = {"from": entry.state.name, "to": state.name, "reason": reason}
            weights = {v.version: v.weight_permille for v in versions}
            if weights != {v.version: v.weight_permille for v in model.versions}:
                details["weights"] = weights
            self._audit(tx, actor, "model.state", f"model/{target}", details)
            changed = replace(model, versions=versions)
            return changed, changed

        return change

    def history(self, name: str) -> list[StateChange]:
        """Every move of `name`'s versions, oldest first (their registration included)."""
        return _history_of(self._store.read(_history_rows(name)))

    async def ahistory(self, name: str) -> list[StateChange]:
        """`history`, read on a worker thread."""
        return _history_of(await self._store.aread(_history_rows(name)))

    def deprecation(self, spec: str) -> lifecycle.Deprecation | None:
        """The deprecation notice of a request for `spec` ("name@version"), when it pins a DEPRECATED version."""
        name, _, pinned = spec.partition("@")
        model = self._models.get(name)
        entry = next((v for v in model.versions if v.version == pinned), None) if model and pinned else None
        if entry is None or entry.state is not VersionState.DEPRECATED:
            return None
        return lifecycle.Deprecation(spec, entry.state_time)

    def _roll_back(self, tx: Tx, model: ModelEntry, canaries: list[str], reason: str, actor: str) -> ModelEntry:
        """Traffic of `canaries` to the stable version, each back to PENDING_APPROVAL; one audit event."""
        stable = model.stable
        previous = {v.version: v.weight_permille for v in model.versions}
        now = self._clock()
        moved = VersionState.PENDING_APPROVAL
        versions = tuple(
            replace(v, weight_permille=v.weight_permille + sum(previous[c] for c in canaries)) if v is stable
            else replace(v, weight_permille=0, state=moved, state_time=now) if v.version in canaries else v
            for v in model.versions)
        for version in canaries:
            self._history(tx, model.name, version, VersionState.ACTIVE, moved, actor, reason)
        self._audit(tx, actor, "model.rollback", f"model/{model.name}", {
            "reason": reason, "to": stable.version, "previous": previous, "states": {c: moved.name for c in canaries}})
        return replace(model, versions=versions)

    def _change(self, name: str, change: Change[T], must_exist: bool = True) -> T:
        """Read `name`'s stored model, change it and write it back (with the change's audit and history
        rows) in one transaction that holds the model's lock: a change decided on another router a moment
        ago is seen, never overwritten. `change` returns (None, result) to write nothing."""
        return self._settle(self._store.write(self._unit(name, change, must_exist)))

    async def _achange(self, name: str, change: Change[T], must_exist: bool = True) -> T:
        """`_change` with its transaction on a worker thread; memory is updated back on the event loop."""
        return self._settle(await self._store.awrite(self._unit(name, change, must_exist)))

    def _unit(self, name: str, change: Change[T], must_exist: bool) -> Callable[[Tx], tuple[int, ModelEntry | None, T]]:
        def unit(tx: Tx) -> tuple[int, ModelEntry | None, T]:
            if tx.dialect == "postgres":
                tx.execute("SELECT pg_advisory_xact_lock(?, hashtext(?))", (REGISTRY_LOCK, name))
            row = tx.one("SELECT body FROM models WHERE name = ?", (name,))
            current = _decode(row["body"]) if row else None
            if current is None and must_exist:
                known = ", ".join(sorted(self._models)) or "none registered"
                raise NotFound(f"unknown model {name!r} (known: {known})", field="model")
            model, result = change(current, tx)
            if model is None:
                return 0, None, result
            version = tx.bump("models")
            tx.execute("INSERT INTO models (name, body, version) VALUES (?, ?, ?) ON CONFLICT(name)"
                       " DO UPDATE SET body = excluded.body, version = excluded.version",
                       (model.name, _encode(model), version))
            return version, model, result

        return unit

    def _settle(self, written: tuple[int, ModelEntry | None, T]) -> T:
        version, model, result = written
        if model is not None:
            self._remember(version, model)
        return result

    def _history(self, tx: Tx, model: str, version: str, from_state: VersionState | None, to_state: VersionState,
                 actor: str, reason: str) -> None:
        tx.execute("INSERT INTO model_version_history (time, model, version, from_state, to_state, actor, reason)"
                   " VALUES (?, ?, ?, ?, ?, ?, ?)", (self._clock().isoformat(), model, version,
                                                     from_state.name if from_state else "", to_state.name, actor,
                                                     reason))

    def _audit(self, tx: Tx, actor: str, action: str, target: str, details: dict[str, object]) -> None:
        tx.execute("INSERT INTO audit (time, actor, action, target, details) VALUES (?,?,?,?,?)",
                   (self._clock().isoformat(), actor, action, target, json.dumps(details, sort_keys=True)))

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
        self._store.write(lambda tx: self._audit(tx, actor, action, target, details))

    async def aaudit(self, actor: str, action: str, target: str, details: dict[str, object]) -> None:
        """`audit`, written on a worker thread."""
        await self._store.awrite(lambda tx: self._audit(tx, actor, action, target, details))

    def close(self) -> None:
        self._store.close()


def _page(page_size: int, page_token: str) -> tuple[int, int | None]:
    """The size of an audit page and the sequence it starts below, from the caller's request."""
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
    return size, before


def _paged(events: list[AuditEvent], size: int) -> tuple[list[AuditEvent], str]:
    if len(events) > size:
        return events[:size], str(events[size - 1].sequence)
    return events, ""


def _audit_rows(action: str, limit: int, before: int | None) -> Callable[[Tx], list[Row]]:
    sql, args = "SELECT * FROM audit WHERE 1 = 1", list[object]()
    if action:
        sql, args = sql + " AND action = ?", [action]
    if before is not None:
        sql, args = sql + " AND seq < ?", [*args, before]
    sql += " ORDER BY seq DESC"
    if limit >= 0:
        sql, args = sql + " LIMIT ?", [*args, limit]
    return lambda tx: tx.all(sql, args)


def _audit_of(rows: list[Row]) -> list[AuditEvent]:
    return [AuditEvent(datetime.fromisoformat(r["time"]), r["actor"], r["action"], r["target"],
                       json.loads(r["details"]), r["seq"]) for r in rows]


def _history_rows(name: str) -> Callable[[Tx], list[Row]]:
    return lambda tx: tx.all("SELECT * FROM model_version_history WHERE model = ? ORDER BY seq", (name,))


def _history_of(rows: list[Row]) -> list[StateChange]:
    return [StateChange(datetime.fromisoformat(r["time"]), r["model"], r["version"],
                        VersionState[r["from_state"]] if r["from_state"] else None, VersionState[r["to_state"]],
                        r["actor"], r["reason"]) for r in rows]


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
                    "state": v.state.name,
                    "state_time": v.state_time.isoformat() if v.state_time else None,
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
            VersionState[v.get("state", "ACTIVE")],  # stored before versions had a life: ACTIVE
            datetime.fromisoformat(v["state_time"]) if v.get("state_time") else None,
        )
        for v in data["versions"]
    )
    return ModelEntry(data["name"], versions, tuple(data["fallback_models"]), data["context_window"])


def _enter_active(versions: tuple[VersionEntry, ...], version: str) -> tuple[VersionEntry, ...]:
    """A version becoming ACTIVE joins with weight 0, unless no ACTIVE version carries traffic: then it is
    the stable version with all of it."""
    if any(v.weight_permille and v.state is VersionState.ACTIVE for v in versions if v.version != version):
        return versions
    return tuple(replace(v, weight_permille=1000 if v.version == version else 0, stable=v.version == version)
                 for v in versions)


def _leave_active(name: str, versions: tuple[VersionEntry, ...], version: str) -> tuple[VersionEntry, ...]:
    """A version leaving ACTIVE gives its traffic to the stable version. The stable version itself may
    leave only as the last ACTIVE one (the model then serves pinned requests only)."""
    leaving = next(v for v in versions if v.version == version)
    others = [v.version for v in versions if v.version != version and v.state is VersionState.ACTIVE]
    if leaving.stable and others:
        raise FailedPrecondition(f"version {name}@{version} is the stable version of model {name!r}: promote "
                                 f"another ACTIVE version ({', '.join(others)}) first", field="version")
    weight = leaving.weight_permille
    return tuple(replace(v, weight_permille=0) if v is leaving
                 else replace(v, weight_permille=v.weight_permille + weight) if v.stable else v
                 for v in versions)
