"""Exact prompt token counts at the router, with the model's own tokenizer and chat template.

A hold (and the rate limiter's up-front admission) bounds a request by its prompt tokens + max_tokens.
Counting the prompt exactly, as the engine will, makes that bound the completion's alone: the byte bound
(`prompt_token_bound`: UTF-8 bytes + a template allowance) is about 2.4x the real count for short chat
prompts, so a budget would refuse requests it covers.

The count runs only where the bound must be exact (`Planner.tighten`): a window the byte bound may not
fit, a conversation, a policy's prompt limit, a key's tokens/min, and a budget hold that the router's
leases cannot cover with the byte bound (the per-request Reserve, and a lease's last room). A request
its leases cover loosely is admitted without a tokenizer pass, and gives the difference back when it
ends, as every request gives back its unused worst case.

For a model version the router finds the build in the model cache (`~/.cache/autoglm/models/<model>/
<version>/`, or `$AUTOGLM_MODEL_CACHE`: the same builds the engines load), reads its manifest, its
`tokenizer.json` and its chat template, once per version (on a worker thread; concurrent first requests
wait for the one load), and counts as the engine does (`services.inference.engine.engine.prompt_ids`):
the chat template's rendering of the messages (or the raw prompt) encoded without added special tokens.
A large prompt is counted off the event loop (`offload`). A version the router cannot load (not built
here, unreadable) keeps the byte bound, the safe fallback; so does a conversation the template refuses
(the engine then refuses it with the template's message, as before).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import structlog
from tokenizers import Tokenizer

from services.common.errors import InvalidInput
from services.inference.chat_template import ChatTemplate
from services.inference.modelbuild.cache import cache_root, model_dir
from services.inference.modelbuild.manifest import load_manifest
from services.router import offload
from services.router.types import Message

log = structlog.get_logger(__name__)
RETRY_MISSING_S = 60.0  # a version not built here is looked for again after this long
ByteBound = Callable[[str, tuple[Message, ...], bool], int]


@dataclass(frozen=True)
class Counter:
    """One model version's tokenizer and template."""

    tokenizer: Tokenizer
    template: ChatTemplate

    def count(self, prompt: str, messages: tuple[Message, ...], raw: bool) -> int:
        text = prompt if raw else self.template.render(messages)
        if len(text) < offload.OFF_LOOP_CHARS:  # counted on the event loop: tens of microseconds
            return len(self.tokenizer.encode(text, add_special_tokens=False))
        # Off the loop, on a worker thread: encode_batch releases the GIL (encode does not), so the event
        # loop goes on meanwhile.
        return len(self.tokenizer.encode_batch([text], add_special_tokens=False)[0].ids)


def load_counter(root: Path, model: str, version: str) -> Counter | None:
    directory = model_dir(root, model, version)
    try:
        manifest = load_manifest(directory)
        tokenizer = Tokenizer.from_file(str(directory / manifest.tokenizer_file))
    except Exception as err:  # a version not built here, an unreadable build, a file tokenizers cannot parse
        log.info("prompt_tokenizer_unavailable", model=model, version=version, reason=str(err)[:200])
        return None
    return Counter(tokenizer, ChatTemplate.for_model(manifest, tokenizer))


class PromptTokens:
    def __init__(self, fallback: ByteBound, root: Path | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.fallback = fallback
        self.root = cache_root(root)
        self._clock = clock
        self._loaded: dict[tuple[str, str], Counter] = {}
        self._missing: dict[tuple[str, str], float] = {}  # version -> when it was last looked for
        self._loading: dict[tuple[str, str], asyncio.Future[Counter | None]] = {}

    async def counter(self, model: str, version: str) -> Counter | None:
        key = (model, version)
        found = self._loaded.get(key)
        if found is not None:
            return found
        missed = self._missing.get(key)
        if missed is not None and self._clock() - missed < RETRY_MISSING_S:
            return None
        pending = self._loading.get(key)
        if pending is None:
            pending = self._loading[key] = asyncio.ensure_future(asyncio.to_thread(load_counter, self.root, *key))
            try:
                loaded = await pending
            finally:
                del self._loading[key]
            if loaded is None:
                self._missing[key] = self._clock()
            else:
                self._loaded[key] = loaded
                self._missing.pop(key, None)
            return loaded
        return await asyncio.shield(pending)

    async def exact(self, model: str, version: str, size: int, prompt: str, messages: tuple[Message, ...],
                    raw: bool) -> int | None:
        """The prompt's tokens as `version` of `model` counts them; None when it cannot count them here."""
        counter = await self.counter(model, version)
        if counter is None:
            return None
        try:
            return await offload.sized(size, counter.count, prompt, messages, raw)
        except InvalidInput:
            return None  # the template refused the conversation: the engine says so with its own message

    async def bound(self, model: str, version: str, size: int, prompt: str, messages: tuple[Message, ...],
                    raw: bool) -> int:
        """The prompt's tokens as `version` of `model` counts them; the byte bound when it cannot count."""
        found = await self.exact(model, version, size, prompt, messages, raw)
        if found is not None:
            return found
        return await offload.sized(size, self.fallback, prompt, messages, raw)
