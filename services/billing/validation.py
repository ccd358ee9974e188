"""Checks on usage events and hold requests before anything is written. Messages say what to fix."""

from __future__ import annotations

import re
from collections.abc import Mapping

from services.billing.model import UsageEvent
from services.common.errors import InvalidInput

MAX_ID = 128
MAX_TEXT = 256
MAX_TAGS = 16
MAX_TAG_TEXT = 64
MAX_TOKENS = 100_000_000
TRACE_ID = re.compile(r"^[0-9a-f]{32}$")
SPAN_ID = re.compile(r"^[0-9a-f]{16}$")


def check_tags(tags: Mapping[str, str], field: str) -> None:
    if len(tags) > MAX_TAGS:
        raise InvalidInput(f"{field} has {len(tags)} tags; at most {MAX_TAGS} are allowed", field=field)
    for key, value in tags.items():
        if not key or len(key) > MAX_TAG_TEXT or len(value) > MAX_TAG_TEXT:
            raise InvalidInput(
                f"{field}: tag {key[:80]!r} is invalid; keys must be 1 to {MAX_TAG_TEXT} characters and values "
                f"at most {MAX_TAG_TEXT}", field=field)


def check_text(value: str, field: str, *, required: bool, limit: int = MAX_TEXT) -> None:
    if required and not value:
        raise InvalidInput(f"{field} is required", field=field)
    if len(value) > limit:
        raise InvalidInput(f"{field} is {len(value)} characters long; at most {limit} are allowed", field=field)


def check_span_id(value: str, field: str) -> None:
    if value and (not SPAN_ID.match(value) or value == "0" * 16):
        raise InvalidInput(f"{field} must be 16 lowercase hex characters, not all zero (a W3C span id)", field=field)


def check_tokens(value: int, field: str) -> None:
    if value < 0:
        raise InvalidInput(f"{field} is {value}; token counts cannot be negative", field=field)
    if value > MAX_TOKENS:
        raise InvalidInput(f"{field} is {value}; at most {MAX_TOKENS} tokens per request are accepted", field=field)


def check_event(event: UsageEvent, now_us: int, max_future_skew_s: int, prefix: str = "event") -> None:
    check_text(event.event_id, f"{prefix}.event_id", required=True, limit=MAX_ID)
    check_text(event.tenant_id, f"{prefix}.tenant_id", required=True)
    check_text(event.api_key_id, f"{prefix}.api_key_id", required=False)
    check_text(event.model, f"{prefix}.model", required=True)
    check_text(event.model_version, f"{prefix}.model_version", required=False)
    check_text(event.request_id, f"{prefix}.request_id", required=False)
    if event.trace_id and not TRACE_ID.match(event.trace_id):
        raise InvalidInput(f"{prefix}.trace_id must be 32 lowercase hex characters (a W3C trace id)",
                           field=f"{prefix}.trace_id")
    check_tokens(event.prompt_tokens, f"{prefix}.prompt_tokens")
    check_tokens(event.completion_tokens, f"{prefix}.completion_tokens")
    check_tags(event.tags, f"{prefix}.tags")
    if len(event.lease_ids) > MAX_TAGS:
        raise InvalidInput(f"{prefix}.lease_ids has {len(event.lease_ids)} ids; at most {MAX_TAGS} (one per budget) "
                           "are allowed", field=f"{prefix}.lease_ids")
    for lease_id in event.lease_ids:
        check_text(lease_id, f"{prefix}.lease_ids", required=True, limit=MAX_ID)
    if event.end_us > now_us + max_future_skew_s * 1_000_000:
        raise InvalidInput(
            f"{prefix}.end_time is {(event.end_us - now_us) // 1_000_000} s in the future; at most "
            f"{max_future_skew_s} s of clock skew is accepted — check the caller's clock", field=f"{prefix}.end_time")
    if event.start_us and event.start_us > event.end_us:
        raise InvalidInput(f"{prefix}.start_time is after its end_time", field=f"{prefix}.start_time")
