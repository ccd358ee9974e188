"""Request policies: blocked terms, max prompt tokens, a max_tokens cap, cache-key normalisation.

A tenant's own policy replaces the global one (tenant "") when it exists. Refusals name the policy,
never the blocked term list.
"""

from __future__ import annotations

import json
import threading
from dataclasses import asdict, dataclass
from pathlib import Path

from services.common.errors import InvalidInput, PermissionDenied
from services.router.sqlite_util import connect
from services.router.types import Message


@dataclass(frozen=True)
class Policy:
    name: str = "default"
    blocked_terms: tuple[str, ...] = ()
    max_prompt_tokens: int = 0
    max_tokens_cap: int = 0
    normalize_cache_keys: bool = False

    def check_text(self, prompt: str, messages: tuple[Message, ...]) -> None:
        if not self.blocked_terms:
            return
        texts = [prompt, *(m.content for m in messages)]
        lowered = [t.lower() for t in texts if t]
        for term in self.blocked_terms:
            needle = term.lower()
            if needle and any(needle in text for text in lowered):
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
    def __init__(self, path: Path) -> None:
        self._conn = connect(path)
        self._conn.execute("CREATE TABLE IF NOT EXISTS policies (tenant_id TEXT PRIMARY KEY, body TEXT NOT NULL)")
        self._lock = threading.Lock()
        self._cache: dict[str, Policy] = {}
        for row in self._conn.execute("SELECT tenant_id, body FROM policies"):
            self._cache[row["tenant_id"]] = _decode(row["body"])

    def set(self, tenant_id: str, policy: Policy) -> Policy:
        if policy.max_prompt_tokens < 0 or policy.max_tokens_cap < 0:
            raise InvalidInput("max_prompt_tokens and max_tokens_cap must be >= 0 (0 = no limit)", field="policy")
        if len(policy.blocked_terms) > 10_000:
            raise InvalidInput("at most 10,000 blocked terms", field="policy.blocked_terms")
        if not policy.name:
            policy = Policy(**{**asdict(policy), "name": f"tenant:{tenant_id}" if tenant_id else "global"})
        with self._lock:
            self._conn.execute(
                "INSERT INTO policies VALUES (?, ?) ON CONFLICT(tenant_id) DO UPDATE SET body = excluded.body",
                (tenant_id, json.dumps(asdict(policy))),
            )
            self._cache[tenant_id] = policy
        return policy

    def for_tenant(self, tenant_id: str) -> Policy:
        return self._cache.get(tenant_id) or self._cache.get("") or Policy(name="global")

    def close(self) -> None:
        self._conn.close()


def _decode(text: str) -> Policy:
    data = json.loads(text)
    data["blocked_terms"] = tuple(data["blocked_terms"])
    return Policy(**data)
