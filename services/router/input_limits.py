"""Size limits, checked first on every call that carries text for a model: before authentication,
policy, context replay, tokenization or any other work, so an oversized request costs the router
about what reading it did.

- `max_prompt_bytes`: UTF-8 bytes of the text the caller sends for the model (the prompt, or every
  message's content; a task's content and its labels/fields/style; each batch item on its own).
- `max_request_bytes`: the whole request as received (prompt, messages, tags, stop sequences and every
  other field), for the calls that run one generation.

A refusal is INVALID_ARGUMENT; its message names the size, the limit and the router setting, and its
field names the largest offending field. The gRPC receive limit of the router is kept above
`max_request_bytes` (see `services/router/server.py`), so these limits, not the transport, answer.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from services.common.errors import InvalidInput

MIB = 1024 * 1024


def utf8_size(text: str) -> int:
    """Bytes of `text` in UTF-8, without encoding it when it is ASCII (the common case)."""
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


@dataclass(frozen=True)
class InputLimits:
    max_prompt_bytes: int = MIB
    max_request_bytes: int = 2 * MIB

    def __post_init__(self) -> None:
        if self.max_prompt_bytes < 1 or self.max_request_bytes < 1:
            raise ValueError("max_prompt_bytes and max_request_bytes must be >= 1")

    def check_prompt(self, texts: Iterable[tuple[str, str]], what: str = "the prompt") -> int:
        """The prompt's size in bytes; INVALID_ARGUMENT when it is over `max_prompt_bytes`. `texts` are
        (field, text) pairs."""
        total, largest, largest_field = 0, -1, ""
        for field, text in texts:
            size = utf8_size(text)
            total += size
            if size > largest:
                largest, largest_field = size, field
        if total > self.max_prompt_bytes:
            raise InvalidInput(
                f"{what} is {total:,} bytes; this router accepts at most {self.max_prompt_bytes:,} bytes of"
                " prompt (router setting max_prompt_bytes): shorten it or split it over several requests",
                field=largest_field, reason="PROMPT_TOO_LARGE",
                metadata={"limit_bytes": str(self.max_prompt_bytes), "size_bytes": str(total),
                          "setting": "max_prompt_bytes"},
            )
        return total

    def check_request(self, request_bytes: int) -> None:
        if request_bytes > self.max_request_bytes:
            raise InvalidInput(
                f"the request is {request_bytes:,} bytes; this router accepts at most {self.max_request_bytes:,}"
                " bytes per request (router setting max_request_bytes), counting messages, tags and stop"
                " sequences",
                field="request", reason="REQUEST_TOO_LARGE",
                metadata={"limit_bytes": str(self.max_request_bytes), "size_bytes": str(request_bytes),
                          "setting": "max_request_bytes"},
            )

    def check(self, request_bytes: int, texts: Iterable[tuple[str, str]]) -> None:
        """Both limits, the prompt's first (it is what an oversized request usually is)."""
        self.check_prompt(texts)
        self.check_request(request_bytes)
