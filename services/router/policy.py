"""Request policies: blocked terms, max prompt tokens, a max_tokens cap, cache-key normalisation and
which models' response cache the tenant shares with other tenants.

A tenant's own policy replaces the global one (tenant "") when it exists. Refusals name the policy,
never the blocked term list.

Blocked terms match case-insensitively (both sides `str.lower()`), as substrings of the prompt or of
one message (a term split across two messages does not match). All terms are found in one pass over
the text with an Aho-Corasick automaton (pyahocorasick), built once when the policy is stored or
loaded, so 10,000 terms cost about what one does.

Response cache sharing: by default every tenant's cached answers and in-flight generations are its
own (keyed by tenant), so no tenant can detect or receive another's generation. `shared_cache_models`
opts a tenant in for the models it names: requests for those models are keyed without the tenant and
shared with every other tenant whose policy names the same model.

Policies are held in memory (a request never reads the database for one) and stored in the router store
(services/router/store); a policy set on another router is seen here within the store's `poll_s`. `aset`
(what AdminService uses) writes on a worker thread, so the event loop never waits on the database.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import cached_property
from pathlib import Path

import ahocorasick

from services.common.errors import InvalidInput, PermissionDenied
from services.router import offload
from services.router.store import Row, Store, Tx, open_store
from services.router.store.migrations import POLICIES
from services.router.types import Message

MAX_BLOCKED_TERMS = 10_000


class TermMatcher:
    """Finds whether any of `terms` (lower-cased; empty ones ignored) occurs in a lower-cased text."""

    def __init__(self, terms: tuple[str, ...]) -> None:
        self._automaton = ahocorasick.Automaton()
        needles = {term.lower() for term in terms if term}
        for needle in needles:
            self._automaton.add_word(needle, needle)
        self._empty = not needles
        if not self._empty:
            self._automaton.make_automaton()

    def found_in(self, text: str) -> bool:
        if self._empty or not text:
            return False
        for _ in self._automaton.iter(text.lower()):
            return True
        return False


@dataclass(frozen=True)
class Policy:
    name: str = "default"
    blocked_terms: tuple[str, ...] = ()
    max_prompt_tokens: int = 0
    max_tokens_cap: int = 0
    normalize_cache_keys: bool = False
    # Models whose response cache (and single-flight) this tenant shares with other tenants that name
    # them too. Empty: every answer this tenant gets is its own (the default).
    shared_cache_models: tuple[str, ...] = ()

    @cached_property
    def matcher(self) -> TermMatcher:
        return TermMatcher(self.blocked_terms)

    def shares_cache_of(self, model: str) -> bool:
        return model in self.shared_cache_models

    def check_text(self, prompt: str, messages: tuple[Message, ...]) -> None:
        """Raises PERMISSION_DENIED when a blocked term occurs in the prompt or in one message. Linear in
        the text's length whatever the number of terms; large inputs are best checked off the event loop."""
        if not self.blocked_terms:
            return
        matcher = self.matcher
        if matcher.found_in(prompt) or any(matcher.found_in(m.content) for m in messages):
            raise PermissionDenied(
                f"the prompt was refused by policy {self.name!r} (blocked content)",
                reason="POLICY_BLOCKED",
                metadata={"policy": self.name},
            )

    def check_max_tokens(self, max_tokens: int) -> None:
        if self.max_tokens_cap and max_tokens > self.max_tokens_cap:
            raise InvalidInput(
                f"max_tokens {max_tokens} exceeds the cap of policy {self.name!r} ({self.max_tokens_cap})",
                field="sampling.max_tokens",
                metadata={"policy": self.name, "limit": str(self.max_tokens_cap)},
            )

    def check_prompt_tokens(self, prompt_tokens: int) -> None:
        if self.max_prompt_tokens and prompt_tokens > self.max_prompt_tokens:
            raise InvalidInput(
                f"the prompt has {prompt_tokens} tokens; policy {self.name!r} allows {self.max_prompt_tokens}",
                field="prompt",
                metadata={"policy": self.name, "limit": str(self.max_prompt_tokens)},
            )


class PolicyStore:
    def __init__(self, store: Store | Path) -> None:
        self._store = open_store(f"sqlite:///{store}") if isinstance(store, Path) else store
        self._store.migrate("policies", POLICIES)
        self._cache: dict[str, Policy] = {}
        self._versions: dict[str, int] = {}

        def load(tx: Tx) -> tuple[int, list[Row]]:
            counter = tx.one("SELECT version FROM router_changes WHERE domain = 'policies'")
            return int(counter["version"]) if counter else 0, tx.all("SELECT tenant_id, body, version FROM policies")

        since, rows = self._store.read(load)
        self._apply(rows)
        self._store.watch("policies", "policies", since, self._apply)

    def set(self, tenant_id: str, policy: Policy) -> Policy:
        policy = _ready(self._checked(tenant_id, policy))  # the matcher is built here, on the admin call
        self._remember(tenant_id, self._store.write(_upsert(tenant_id, policy)), policy)
        return policy

    async def aset(self, tenant_id: str, policy: Policy) -> Policy:
        """`set` with the write on a worker thread (and the matcher built there too when the terms are many)."""
        policy = self._checked(tenant_id, policy)
        policy = await offload.sized(sum(map(len, policy.blocked_terms)), _ready, policy)
        self._remember(tenant_id, await self._store.awrite(_upsert(tenant_id, policy)), policy)
        return policy

    @staticmethod
    def _checked(tenant_id: str, policy: Policy) -> Policy:
        if policy.max_prompt_tokens < 0 or policy.max_tokens_cap < 0:
            raise InvalidInput("max_prompt_tokens and max_tokens_cap must be >= 0 (0 = no limit)", field="policy")
        if len(policy.blocked_terms) > MAX_BLOCKED_TERMS:
            raise InvalidInput(f"at most {MAX_BLOCKED_TERMS:,} blocked terms", field="policy.blocked_terms")
        if any(not model for model in policy.shared_cache_models):
            raise InvalidInput("shared_cache_models holds model names; an empty one is not",
                               field="policy.shared_cache_models")
        if not policy.name:
            policy = Policy(**{**asdict(policy), "name": f"tenant:{tenant_id}" if tenant_id else "global"})
        return policy

    def for_tenant(self, tenant_id: str) -> Policy:
        return self._cache.get(tenant_id) or self._cache.get("") or Policy(name="global")

    def close(self) -> None:
        self._store.close()

    def _apply(self, rows: list[Row]) -> None:
        for row in rows:
            if int(row["version"]) >= self._versions.get(row["tenant_id"], -1):
                self._remember(row["tenant_id"], int(row["version"]), _ready(_decode(row["body"])))

    def _remember(self, tenant_id: str, version: int, policy: Policy) -> None:
        if version >= self._versions.get(tenant_id, -1):
            self._versions[tenant_id] = version
            self._cache[tenant_id] = policy


def _upsert(tenant_id: str, policy: Policy) -> Callable[[Tx], int]:
    body = json.dumps(asdict(policy))

    def upsert(tx: Tx) -> int:
        version = tx.bump("policies")
        tx.execute("INSERT INTO policies (tenant_id, body, version) VALUES (?, ?, ?) ON CONFLICT(tenant_id)"
                   " DO UPDATE SET body = excluded.body, version = excluded.version", (tenant_id, body, version))
        return version

    return upsert


def _ready(policy: Policy) -> Policy:
    policy.matcher  # noqa: B018 - builds and caches the automaton
    return policy


def _decode(text: str) -> Policy:
    data = json.loads(text)
    data["blocked_terms"] = tuple(data["blocked_terms"])
    data["shared_cache_models"] = tuple(data.get("shared_cache_models", ()))
    return Policy(**data)
