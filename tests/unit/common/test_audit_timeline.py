"""The router's and billing's audit logs merged into one timeline: newest first, one page token carrying
each log's position, no event skipped or repeated across pages (ties included), a tampered token refused."""

from __future__ import annotations

import base64
import json

import pytest

from services.common.audit_timeline import TimelineEvent, decode_token, encode_token, timeline_page
from services.common.errors import InvalidInput


class Log:
    """A log paged as both real ones are: newest first by sequence, the token after an event is its
    sequence, a next token only when more events follow (one looked ahead)."""

    def __init__(self, source: str, times: list[int], actions: list[str] | None = None) -> None:
        self.source = source
        self.events: list[TimelineEvent] = []
        self.calls = 0
        for time_us, action in zip(times, actions or ["x"] * len(times), strict=True):
            self.add(time_us, action)

    def add(self, time_us: int, action: str = "x") -> TimelineEvent:
        event = TimelineEvent(time_us, self.source, len(self.events) + 1, "op", action, f"{self.source}/{time_us}")
        self.events.append(event)
        return event

    async def __call__(self, action: str, size: int, token: str) -> tuple[list[TimelineEvent], str]:
        self.calls += 1
        before = int(token) if token else 2**62
        found = [e for e in reversed(self.events) if e.sequence < before and (not action or e.action == action)]
        page = found[:size]
        return page, str(page[-1].sequence) if len(found) > size else ""


def ids(events: list[TimelineEvent]) -> list[tuple[str, int]]:
    return [(e.source, e.sequence) for e in events]


async def walk(logs: dict[str, Log], size: int, action: str = "", source: str = "all") -> list[list[TimelineEvent]]:
    pages, token = [], ""
    while True:
        events, token = await timeline_page(logs, action, size, token, source)
        pages.append(events)
        if not token:
            return pages
        assert len(pages) < 100, "paging never ends"


def merged(logs: dict[str, Log]) -> list[tuple[str, int]]:
    everything = [e for log in logs.values() for e in log.events]
    order = {"router": 0, "billing": 1}
    return ids(sorted(everything, key=lambda e: (-e.time_us, order[e.source], -e.sequence)))


@pytest.mark.parametrize("size", [1, 2, 3, 4, 7, 50])
async def test_pages_together_are_both_logs_newest_first_each_event_once_even_with_ties(size: int) -> None:
    # Ties within a log and across both, at page boundaries for most sizes.
    logs = {"router": Log("router", [10, 20, 20, 30, 30, 30, 50, 60]),
            "billing": Log("billing", [5, 20, 30, 30, 40, 60, 60])}
    pages = await walk(logs, size)
    shown = [e for page in pages for e in page]
    assert ids(shown) == merged(logs)
    assert len(set(ids(shown))) == len(shown) == 15
    assert all(len(page) == size for page in pages[:-1]) and 1 <= len(pages[-1]) <= size
    times = [e.time_us for e in shown]
    assert times == sorted(times, reverse=True)


async def test_at_the_same_microsecond_the_router_comes_first_then_each_logs_own_order() -> None:
    logs = {"router": Log("router", [7, 7]), "billing": Log("billing", [7, 7])}
    first, token = await timeline_page(logs, "", 3, "")
    assert ids(first) == [("router", 2), ("router", 1), ("billing", 2)]
    rest, last = await timeline_page(logs, "", 3, token)
    assert ids(rest) == [("billing", 1)] and last == ""


async def test_each_page_reads_each_log_once() -> None:
    logs = {"router": Log("router", list(range(1, 40))), "billing": Log("billing", list(range(1, 40)))}
    pages = await walk(logs, 10)
    assert len(pages) == 8 and logs["router"].calls == logs["billing"].calls == 8


async def test_one_log_empty_pages_the_other_alone() -> None:
    logs = {"router": Log("router", []), "billing": Log("billing", [1, 2, 3, 4, 5])}
    pages = await walk(logs, 2)
    assert [ids(p) for p in pages] == [[("billing", 5), ("billing", 4)], [("billing", 3), ("billing", 2)],
                                       [("billing", 1)]]
    assert logs["router"].calls == 1, "an empty log is not asked again once the token says it is exhausted"


async def test_a_log_exhausted_early_is_not_read_again_and_the_other_goes_on() -> None:
    logs = {"router": Log("router", [100, 101]), "billing": Log("billing", list(range(1, 11)))}
    first, token = await timeline_page(logs, "", 4, "")
    assert ids(first) == [("router", 2), ("router", 1), ("billing", 10), ("billing", 9)]
    assert decode_token(token) == {"router": None, "billing": "9"}
    pages = await walk(logs, 4)
    assert ids([e for p in pages for e in p]) == merged(logs)
    assert logs["router"].calls == 2, "read for the first page only (once here, once in walk)"


async def test_events_recorded_while_paging_do_not_shift_the_next_page() -> None:
    logs = {"router": Log("router", [10, 30, 50]), "billing": Log("billing", [20, 40, 60])}
    first, token = await timeline_page(logs, "", 3, "")
    assert ids(first) == [("billing", 3), ("router", 3), ("billing", 2)]
    logs["router"].add(70)
    logs["billing"].add(80)
    rest, last = await timeline_page(logs, "", 3, token)
    assert ids(rest) == [("router", 2), ("billing", 1), ("router", 1)] and last == ""


async def test_filters_by_action_and_by_source() -> None:
    logs = {"router": Log("router", [1, 2, 3], ["key.revoke", "model.split", "key.revoke"]),
            "billing": Log("billing", [4, 5], ["budget.update", "key.revoke"])}
    events, _ = await timeline_page(logs, "key.revoke", 10, "")
    assert ids(events) == [("billing", 2), ("router", 3), ("router", 1)]
    only_router = [e for p in await walk(logs, 1, source="router") for e in p]
    assert ids(only_router) == [("router", 3), ("router", 2), ("router", 1)]
    billing_calls = logs["billing"].calls
    assert ids((await timeline_page(logs, "", 10, "", "billing"))[0]) == [("billing", 2), ("billing", 1)]
    assert logs["billing"].calls == billing_calls + 1
    with pytest.raises(InvalidInput, match="source must be one of all, router, billing") as bad:
        await timeline_page(logs, "", 10, "", "ledger")
    assert bad.value.field == "source"


def _token(doc: object) -> str:
    return base64.urlsafe_b64encode(json.dumps(doc).encode()).decode().rstrip("=")


@pytest.mark.parametrize("token", [
    "not-a-token", "%%%", "x" * 500, "é", _token([1, 2]), _token({"router": "3"}),
    _token({"router": "3", "billing": "4", "ledger": "5"}), _token({"router": "-3", "billing": ""}),
    _token({"router": "0", "billing": ""}), _token({"router": 3, "billing": ""}),
    _token({"router": "3 ", "billing": ""}), _token({"router": "1" * 19, "billing": ""}),
    base64.urlsafe_b64encode(b"\xff\xfe").decode(),
])
async def test_a_tampered_token_is_refused_as_bad_input_naming_the_page_token(token: str) -> None:
    logs = {"router": Log("router", [1]), "billing": Log("billing", [2])}
    with pytest.raises(InvalidInput, match="page_token is not one this console handed out") as refused:
        await timeline_page(logs, "", 10, token)
    assert refused.value.field == "page_token"
    assert logs["router"].calls == logs["billing"].calls == 0


def test_a_token_round_trips_and_none_is_left_when_every_log_is_exhausted() -> None:
    positions: dict[str, str | None] = {"router": "12", "billing": None}
    assert decode_token(encode_token(positions)) == positions
    assert decode_token("") == {"router": "", "billing": ""}
    assert encode_token({"router": None, "billing": None}) == ""
