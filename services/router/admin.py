"""The router's operator operations, one place for every transport: API keys, tenant policies, the model
registry (versions, their states, traffic splits, promotion, rollback) and the audit log.

Each change to credentials or policy is recorded in the audit log with its actor. Plain domain types in
and out; the caller (AdminServicer today) has already checked the admin token. Every operation that
reads or writes the router store is a coroutine whose transaction runs on a worker thread: an operator
call waiting on the database (a slow disk, a lock another router holds) never stops the event loop, and
with it every other caller. Reads served from memory (`get_policy`, `get_model`) stay plain functions.
"""

from __future__ import annotations

from collections.abc import Callable

from services.common.errors import DomainError, InvalidInput
from services.common.generation import Sampling
from services.router.auth.api_keys import ApiKeyRecord, NewApiKey
from services.router.auth.key_store import KeyStore
from services.router.lifecycle import StateChange, VersionState
from services.router.policy import Policy, PolicyStore
from services.router.ports import InferencePort
from services.router.registry import AuditEvent, CanaryPolicy, ModelEntry, Registry


class Admin:
    def __init__(self, keys: KeyStore, registry: Registry, policies: PolicyStore, inference: InferencePort,
                 healthy_replicas: Callable[[ModelEntry], dict[str, int]]) -> None:
        self._keys = keys
        self._registry = registry
        self._policies = policies
        self._inference = inference
        self.healthy_replicas = healthy_replicas

    # --- API keys ----------------------------------------------------------------------------------
    async def create_key(self, spec: NewApiKey, actor: str = "admin") -> tuple[ApiKeyRecord, str]:
        record, secret = await self._keys.acreate(spec)
        await self._registry.aaudit(actor, "key.create", f"key/{record.key_id}", {
            "prefix": record.prefix, "tenant_id": record.tenant_id, "name": record.name,
            "allowed_models": list(record.allowed_models), "requests_per_minute": record.requests_per_minute,
            "tokens_per_minute": record.tokens_per_minute, "traffic_class": record.traffic_class.name.lower(),
        })
        return record, secret

    async def list_keys(self, tenant_id: str, include_revoked: bool) -> list[ApiKeyRecord]:
        return await self._keys.alist(tenant_id, include_revoked)

    async def revoke_key(self, key_id: str, actor: str = "admin") -> ApiKeyRecord:
        already = (await self._keys.aget(key_id)).revoke_time is not None
        record = await self._keys.arevoke(key_id)
        if not already:  # revoking twice changes nothing, and is not recorded twice
            await self._registry.aaudit(actor, "key.revoke", f"key/{key_id}",
                                 {"prefix": record.prefix, "tenant_id": record.tenant_id})
        return record

    # --- policies ----------------------------------------------------------------------------------
    async def set_policy(self, tenant_id: str, policy: Policy, actor: str = "admin") -> Policy:
        """Store a tenant's policy (its matcher built off the event loop when the terms are many)."""
        stored = await self._policies.aset(tenant_id, policy)
        # The blocked terms are a secret list: the log says how many, never which.
        await self._registry.aaudit(actor, "policy.set", f"tenant/{tenant_id or '*'}", {
            "blocked_terms": len(stored.blocked_terms), "max_prompt_tokens": stored.max_prompt_tokens,
            "max_tokens_cap": stored.max_tokens_cap, "normalize_cache_keys": stored.normalize_cache_keys,
            "shared_cache_models": list(stored.shared_cache_models),
        })
        return stored

    async def set_policy_offloaded(self, tenant_id: str, policy: Policy, actor: str = "admin") -> Policy:
        """`set_policy` (which now always keeps the event loop free), under its earlier name."""
        return await self.set_policy(tenant_id, policy, actor)

    def get_policy(self, tenant_id: str) -> Policy:
        return self._policies.for_tenant(tenant_id)

    # --- the model registry ------------------------------------------------------------------------
    async def register(
        self, name: str, version: str, replicas: tuple[str, ...], fallbacks: tuple[str, ...], canary: CanaryPolicy,
        default_sampling: Sampling | None = None, initial_state: VersionState | None = None,
    ) -> ModelEntry:
        """Register a model version (ACTIVE unless `initial_state` says otherwise); its context window comes
        from the first replica that answers."""
        window = 0
        for address in replicas:
            try:
                info = await self._inference.model_info(address)
                window = info.context_window
                break
            except DomainError:
                continue
        if not name:
            raise InvalidInput("model is required", field="model")
        return await self._registry.aregister(name, version, replicas, fallbacks, canary, context_window=window,
                                              default_sampling=default_sampling, initial_state=initial_state)

    async def set_split(self, model: str, weights_permille: dict[str, int], actor: str = "admin") -> ModelEntry:
        await self._registry.aset_split(model, weights_permille, actor=actor)
        return self._registry.get(model)

    async def promote(self, model: str, version: str, actor: str = "admin") -> ModelEntry:
        await self._registry.apromote(model, version, actor=actor)
        return self._registry.get(model)

    async def rollback(self, model: str, reason: str, actor: str = "admin") -> ModelEntry:
        await self._registry.arollback(model, reason or "manual rollback", actor=actor)
        return self._registry.get(model)

    async def set_state(self, model: str, version: str, state: VersionState, operator: str,
                        reason: str) -> ModelEntry:
        """Move a version through its life, by `operator` for `reason` (both recorded)."""
        return await self._registry.aset_state(model, version, state, operator, reason)

    def get_model(self, model: str) -> ModelEntry:
        return self._registry.get(model)

    async def history(self, model: str) -> list[StateChange]:
        """Every state move of the model's versions, oldest first."""
        return await self._registry.ahistory(model)

    # --- the audit log -----------------------------------------------------------------------------
    async def audit_page(self, action: str, page_size: int, page_token: str) -> tuple[list[AuditEvent], str]:
        return await self._registry.aaudit_page(action, page_size, page_token)
