"""The router's and billing's audit logs as one timeline, newest first, paged with one token.

Each log is cursor-paged newest first by its own sequence number, and the token after an event is that
event's sequence (`seq < token` is the rest: `Registry.audit_page`, billing's `audit.list_events`). A page
of the timeline fetches one page from each log it shows (at once), merges them by time (ties: router
before billing, then the log's own order) and keeps `page_size` events. Its token carries, per log, the
sequence of the last event taken from it, or that the log is exhausted, so the next page goes on exactly
where this one stopped: the merge depends only on what is left of each log, so no event is skipped or
repeated, whatever the ties. Plain types in and out; the console and `autoglm audit` give it their fetchers.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field

from services.common.errors import InvalidInput

SOURCES = ("router", "billing")  # also the order of events recorded at the same microsecond
CHOICES = ("all", *SOURCES)
_START = ""  # a log's position before its newest event
_MAX_TOKEN = 200


@dataclass(frozen=True)
class TimelineEvent:
    time_us: int
    source: str  # the service that recorded it: router or billing
    sequence: int  # its log's own order: larger is newer, and the log's page token after it
    actor: str
    action: str
    target: str
    details: dict[str, object] = field(default_factory=dict)


# (action, page_size, page_token) -> the log's events newest first and its next page token ("" when none)
Fetch = Callable[[str, int, str], Awaitable[tuple[list[TimelineEvent], str]]]


def details_of(details_json: str) -> dict[str, object]:
    """Billing's `details_json` as the details of a timeline event ({} when it is not a JSON object)."""
    try:
        details = json.loads(details_json or "{}")
    except ValueError:
        return {}
    return details if isinstance(details, dict) else {}


def sources_of(choice: str) -> tuple[str, ...]:
    if choice not in CHOICES:
        raise InvalidInput(f"source must be one of {', '.join(CHOICES)}, got {choice[:40]!r}", field="source")
    return SOURCES if choice == "all" else (choice,)


def _bad_token() -> InvalidInput:
    return InvalidInput("page_token is not one this console handed out; follow the page's own link (or pass a "
                        "response's next_page_token unchanged), or leave it out for the newest events",
                        field="page_token")


def decode_token(token: str) -> dict[str, str | None]:
    """Per log: the sequence its next event is below ("" from the newest), or None when it is exhausted."""
    positions: dict[str, str | None] = dict.fromkeys(SOURCES, _START)
    if not token:
        return positions
    if len(token) > _MAX_TOKEN or not token.isascii():
        raise _bad_token()
    try:
        doc = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode())
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise _bad_token() from None
    if not isinstance(doc, dict) or set(doc) != set(SOURCES):
        raise _bad_token()
    for source in SOURCES:
        value = doc[source]
        if value is not None and not (isinstance(value, str) and (value == _START or (
                value.isascii() and value.isdigit() and len(value) <= 18 and int(value) >= 1))):
            raise _bad_token()
        positions[source] = value
    return positions


def encode_token(positions: Mapping[str, str | None]) -> str:
    """The token of these positions, or "" when every log is exhausted (there is no next page)."""
    if all(positions[s] is None for s in SOURCES):
        return ""
    doc = json.dumps({s: positions[s] for s in SOURCES}, separators=(",", ":"))
    return base64.urlsafe_b64encode(doc.encode()).decode().rstrip("=")


def _newest_first(event: TimelineEvent) -> tuple[int, int, int]:
    return -event.time_us, SOURCES.index(event.source), -event.sequence


async def timeline_page(fetchers: Mapping[str, Fetch], action: str, page_size: int, page_token: str,
                        source: str = "all") -> tuple[list[TimelineEvent], str]:
    """One page of the logs `source` names (all, router or billing), filtered by `action` ("" for all),
    newest first, and the token of the next page ("" when none). One fetch per log shown, run together."""
    if page_size < 1:
        raise InvalidInput(f"page_size must be positive, got {page_size}", field="page_size")
    shown = sources_of(source)
    positions = decode_token(page_token)
    live = [s for s in shown if positions[s] is not None]
    pages = await asyncio.gather(*(fetchers[s](action, page_size, positions[s] or _START) for s in live))
    heads: dict[str, Sequence[TimelineEvent]] = {s: events for s, (events, _) in zip(live, pages, strict=True)}
    more = {s: bool(token) for s, (_, token) in zip(live, pages, strict=True)}
    taken = dict.fromkeys(live, 0)
    out: list[TimelineEvent] = []
    while len(out) < page_size:
        ready = [s for s in live if taken[s] < len(heads[s])]
        if not ready:
            break
        pick = min(ready, key=lambda s: _newest_first(heads[s][taken[s]]))
        out.append(heads[pick][taken[pick]])
        taken[pick] += 1
    for s in live:
        if taken[s] == len(heads[s]) and not more[s]:
            positions[s] = None  # everything it holds (for this filter) is shown
        elif taken[s]:
            positions[s] = str(heads[s][taken[s] - 1].sequence)
    if all(positions[s] is None for s in shown):
        return out, ""
    return out, encode_token(positions)
