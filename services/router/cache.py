"""The exact response cache: whole-request keys, LRU with an entry and byte bound, and a TTL.

A key is the SHA-256 of the canonical JSON of everything that shapes the answer: model, the resolved
version, every sampling parameter, raw-prompt mode and the full prompt or messages (after context
replay) — and the tenant, so one tenant's answer is never another's, and a cache hit or a shared
in-flight generation (single-flight uses the same key) tells nothing about other tenants' prompts.
The key is tenant-free (scope None) only for a model the tenant's policy explicitly shares
(`Policy.shared_cache_models`); tenants sharing a model then share its entries. Only deterministic
requests are cached unless the caller opts in. Normalisation that changes meaning (lower-casing,
collapsing whitespace) is applied only when the tenant's policy asks for it, and is part of the key.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import asdict, dataclass

from services.common.generation import FinishReason
from services.router.types import Message, Sampling

_SPACES = re.compile(r"\s+")


def normalise(text: str) -> str:
    return _SPACES.sub(" ", text).strip().lower()


def cache_key(
    model: str,
    version: str,
    sampling: Sampling,
    prompt: str,
    messages: tuple[Message, ...],
    raw_prompt: bool,
    normalise_text: bool = False,
    *,
    scope: str | None,
) -> str:
    """`scope`: the tenant the entry belongs to, or None for an entry shared between tenants."""
    text = normalise if normalise_text else (lambda s: s)
    document = {
        "scope": scope,
        "normalised": normalise_text,
        "model": model,
        "version": version,
        "sampling": asdict(sampling),
        "raw_prompt": raw_prompt,
        "prompt": text(prompt),
        "messages": [[int(m.role), text(m.content)] for m in messages],
    }
    return hashlib.sha256(json.dumps(document, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


@dataclass(frozen=True)
class CachedAnswer:
    text: str
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    model: str
    model_version: str

    @property
    def size(self) -> int:
        return len(self.text.encode()) + 128


class ResponseCache:
    def __init__(
        self,
        max_entries: int = 10_000,
        max_bytes: int = 64 * 1024 * 1024,
        ttl_s: float = 3600.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._max_entries = max_entries
        self._max_bytes = max_bytes
        self._ttl_s = ttl_s
        self._clock = clock
        self._entries: OrderedDict[str, tuple[float, CachedAnswer]] = OrderedDict()
        self._bytes = 0
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str) -> CachedAnswer | None:
        item = self._entries.get(key)
        if item is None:
            self.misses += 1
            return None
        stored_at, answer = item
        if self._clock() - stored_at > self._ttl_s:
            self._drop(key)
            self.misses += 1
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        return answer

    def put(self, key: str, answer: CachedAnswer) -> None:
        if self._max_entries <= 0 or answer.size > self._max_bytes:
            return
        if key in self._entries:
            self._drop(key)
        self._entries[key] = (self._clock(), answer)
        self._bytes += answer.size
        while len(self._entries) > self._max_entries or self._bytes > self._max_bytes:
            self._drop(next(iter(self._entries)))

    def _drop(self, key: str) -> None:
        _, answer = self._entries.pop(key)
        self._bytes -= answer.size
