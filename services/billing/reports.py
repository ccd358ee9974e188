"""Usage reports: requests, tokens and cost over [start, end), grouped by dimensions and time buckets.

Whole hours are read from the hourly rollups (`usage_hours`, see `rollups`) and only the partial hours at
the window's edges from the events, both summed in SQL and folded here, so a report costs about the number
of rollup rows, not the number of events; the result is the same as a scan of the events (to the
micro-unit). Minute buckets can only come from the events, so a minute-granularity report scans them.

Anomalies are flagged per api key: more than `max_requests` requests within any `window_s` seconds, or an
hour whose spend exceeds `hourly_factor_permille`/1000 x the key's mean hourly spend over the 7 days before
the window (with at least 3 hours of history). A row is anomalous when any key counted in it is. Hourly
spend comes from the rollups; a key's timestamps are read from the events only for the hours where its
rollups allow a burst (more than `max_requests` requests in the hours one window can touch), and for whole
hours only once per process while their counts do not change (`BurstMemo`).
"""

from __future__ import annotations

import json
from bisect import bisect_left
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime

from services.billing.rollups import HOUR_US
from services.billing.store.base import Row, Tx
from services.common.errors import InvalidInput

US = 1_000_000
DIMENSIONS = ("tenant", "api_key", "model", "model_version", "tag", "status", "source")
STATUS_NAMES = {0: "unspecified", 1: "completed", 2: "cancelled", 3: "failed"}
# Who metered an event (services/billing/engine_usage.py): the router, or a replica's record billed instead.
SOURCE_NAMES = {0: "router", 1: "router", 2: "engine"}
GRANULARITY_US = {"minute": 60 * US, "hour": 3600 * US, "day": 86400 * US}
HISTORY_US = 7 * 86400 * US
# Each dimension's column in both `events` and `usage_hours` (a tag is read from the tag set).
COLUMNS = {"tenant": "tenant_id", "api_key": "api_key_id", "model": "model", "model_version": "model_version",
           "tag": "tags_json", "status": "status", "source": "source"}
Sums = list[int]  # requests, prompt tokens, completion tokens, cached requests, cost


@dataclass(frozen=True)
class ReportQuery:
    start_us: int
    end_us: int
    group_by: tuple[str, ...] = ()
    tag_key: str = ""
    granularity: str = ""  # "", "minute", "hour", "day", "month"
    tenant_id: str = ""
    top_n: int = 0


@dataclass(frozen=True)
class AnomalyRule:
    max_requests: int = 50
    window_s: int = 10
    hourly_factor_permille: int = 3000


@dataclass
class ReportRow:
    bucket_start_us: int
    group: dict[str, str]
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_micros: int = 0
    cached_requests: int = 0
    anomalous: bool = False
    keys: set[str] = field(default_factory=set, repr=False)


def check_query(q: ReportQuery) -> None:
    if q.end_us <= q.start_us:
        raise InvalidInput("end_time must be after start_time (the window is [start_time, end_time))",
                           field="end_time")
    for dim in q.group_by:
        if dim not in DIMENSIONS:
            raise InvalidInput(f"unknown dimension {dim!r}; use one of {', '.join(DIMENSIONS)}", field="group_by")
    if "tag" in q.group_by and not q.tag_key:
        raise InvalidInput("grouping by tag needs tag_key (which tag to group by)", field="tag_key")
    if q.granularity not in ("", "month", *GRANULARITY_US):
        raise InvalidInput(f"unknown granularity {q.granularity!r}; use minute, hour, day or month", field="granularity")
    if q.top_n < 0:
        raise InvalidInput("top_n cannot be negative", field="top_n")


def _bucket(t_us: int, q: ReportQuery) -> int:
    if not q.granularity:
        return q.start_us
    if q.granularity == "month":
        d = datetime.fromtimestamp(t_us / US, tz=UTC)
        return int(datetime(d.year, d.month, 1, tzinfo=UTC).timestamp()) * US
    size = GRANULARITY_US[q.granularity]
    return t_us - t_us % size


def split(start_us: int, end_us: int, rollups: bool = True) -> tuple[list[tuple[int, int]], tuple[int, int] | None]:
    """[start, end) as (the partial edge ranges read from events, the whole hours read from rollups or None)."""
    first, last = -(-start_us // HOUR_US) * HOUR_US, end_us // HOUR_US * HOUR_US
    if not rollups or first >= last:
        return [(start_us, end_us)], None
    return [(a, b) for a, b in ((start_us, first), (last, end_us)) if a < b], (first, last)


def _sources(tx: Tx, start_us: int, end_us: int, tenant_id: str, columns: str, rollups: bool,
             time_step_us: int = 0) -> list[Row]:
    """Rows of (time, <columns>, requests, prompt, completion, cached, cost) over rollups and edge events.

    Summed in SQL per `columns` (which both tables have) and, with `time_step_us` (an hour or a minute), per
    end time rounded down to that step (rollup rows carry their hour); without it the time is 0.
    """
    edges, whole = split(start_us, end_us, rollups)
    where = " AND tenant_id = ?" if tenant_id else ""
    extra = [tenant_id] if tenant_id else []
    out: list[Row] = []
    if whole is not None:
        hour = "hour_us" if time_step_us else "0"
        grouped = f"hour_us, {columns}" if time_step_us else columns
        out += tx.all(f"SELECT {hour}, {columns}, SUM(requests), SUM(prompt_tokens), SUM(completion_tokens),"
                      f" SUM(cached_requests), SUM(cost_micros) FROM usage_hours WHERE hour_us >= ? AND hour_us < ?"
                      f"{where} GROUP BY {grouped}", [*whole, *extra])
    bucket = f"end_us / {time_step_us} * {time_step_us}" if time_step_us else "0"
    grouped = f"{bucket}, {columns}" if time_step_us else columns
    for lo, hi in edges:
        out += tx.all(f"SELECT {bucket}, {columns}, COUNT(*), SUM(prompt_tokens), SUM(completion_tokens), SUM(cached),"
                      f" SUM(cost_micros) FROM events WHERE end_us >= ? AND end_us < ?{where} GROUP BY {grouped}",
                      [lo, hi, *extra])
    return out


def key_hours(tx: Tx, start_us: int, end_us: int, tenant_id: str, rollups: bool = True) -> dict[str, dict[int, Sums]]:
    """Per api key, per hour of end time with events in [start, end): [requests, cost]."""
    found: dict[str, dict[int, Sums]] = defaultdict(dict)
    for hour, key, requests, _p, _c, _cached, cost in _sources(tx, start_us, end_us, tenant_id, "api_key_id",
                                                               rollups, HOUR_US):
        sums = found[str(key)].setdefault(int(hour), [0, 0])
        sums[0] += int(requests)
        sums[1] += int(cost)
    return found


class BurstMemo:
    """Whether a key's events in one range of whole hours hold a burst, remembered with the hourly counts it
    was decided from. The ledger only grows, so equal counts mean the same events and the answer stands; a
    late event changes a count and the hours are read again. One per process, bounded."""

    def __init__(self, limit: int = 1_000_000) -> None:
        self.limit = limit
        self._found: dict[tuple[str, str, int, int, int, int], tuple[tuple[int, ...], bool]] = {}

    def get(self, ident: tuple[str, str, int, int, int, int], counts: tuple[int, ...]) -> bool | None:
        found = self._found.get(ident)
        return found[1] if found is not None and found[0] == counts else None

    def put(self, ident: tuple[str, str, int, int, int, int], counts: tuple[int, ...], burst: bool) -> None:
        if len(self._found) >= self.limit:
            self._found.clear()
        self._found[ident] = (counts, burst)


def _has_burst(stamps: list[int], rule: AnomalyRule) -> bool:
    """More than `max_requests` of these sorted times within `window_s` seconds."""
    n, window = rule.max_requests, rule.window_s * US
    return any(stamps[i] - stamps[i - n] < window for i in range(n, len(stamps)))


def _bursting(tx: Tx, q: ReportQuery, rule: AnomalyRule, hours: dict[str, dict[int, Sums]],
              memo: BurstMemo | None) -> set[str]:
    """Keys with more than `max_requests` requests within `window_s` seconds inside the window.

    A burst whose first request falls in hour h lies in [h, h + 1 h + window): only such ranges whose
    rollups hold more than `max_requests` of the key's requests are read from the events. A burst inside
    the window's whole hours is looked for once per process while those hours' counts stay the same
    (`memo`); any other burst has a request in a partial edge hour, so it lies within one window of an edge,
    and those few seconds and the edge hours are read every time.
    """
    window = rule.window_s * US

    def count(by_hour: dict[int, Sums], lo: int, hi: int) -> tuple[int, ...]:
        first_hour = lo - lo % HOUR_US
        return tuple(by_hour[h][0] if h in by_hour else 0 for h in range(first_hour, hi, HOUR_US))

    _edges, whole = split(q.start_us, q.end_us)
    if whole is None:
        ranges = [(q.start_us, q.end_us)]
        first = last = q.end_us
    else:
        first, last = whole
        ranges = [(q.start_us, min(first + window, q.end_us)), (max(last - window, q.start_us), q.end_us)]
    flagged: set[str] = set()
    todo: list[tuple[str, int, int, tuple[str, str, int, int, int, int] | None, tuple[int, ...]]] = []
    for key, by_hour in hours.items():
        if sum(s[0] for s in by_hour.values()) <= rule.max_requests:
            continue
        for lo, hi in ranges:  # near the edges: read every time
            if lo < hi and sum(count(by_hour, lo, hi)) > rule.max_requests:
                todo.append((key, lo, hi, None, ()))
        for hour in sorted(h for h in by_hour if first <= h < last):
            hi = min(hour + HOUR_US + window, last)
            if window < HOUR_US:  # the usual rule: this hour and, unless it is the last, the next
                after = by_hour.get(hour + HOUR_US) if hi > hour + HOUR_US else None
                counts: tuple[int, ...] = (by_hour[hour][0],) if after is None else (by_hour[hour][0], after[0])
            else:
                counts = count(by_hour, hour, hi)
            if sum(counts) <= rule.max_requests:
                continue
            ident = (q.tenant_id, key, hour, hi, rule.max_requests, rule.window_s)
            known = memo.get(ident, counts) if memo is not None else None
            if known:
                flagged.add(key)
                break
            if known is None:
                todo.append((key, hour, hi, ident, counts))
    todo = [t for t in todo if t[0] not in flagged]
    merged: list[list[int]] = []
    for lo, hi in sorted((t[1], t[2]) for t in todo):
        if merged and lo <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], hi)
        else:
            merged.append([lo, hi])
    wanted = {t[0] for t in todo}
    times: dict[str, list[int]] = defaultdict(list)
    where = " AND tenant_id = ?" if q.tenant_id else ""
    for lo, hi in merged:
        for key, end_us in tx.all(f"SELECT api_key_id, end_us FROM events WHERE end_us >= ? AND end_us < ?{where}",
                                  [lo, hi] + ([q.tenant_id] if q.tenant_id else [])):
            if key in wanted:
                times[key].append(int(end_us))
    for stamps in times.values():
        stamps.sort()
    for key, lo, hi, remembered_as, counts in todo:
        stamps = times.get(key, [])
        burst = _has_burst(stamps[bisect_left(stamps, lo):bisect_left(stamps, hi)], rule)
        if remembered_as is not None and memo is not None:
            memo.put(remembered_as, counts, burst)
        if burst:
            flagged.add(key)
    return flagged


def _history(tx: Tx, start_us: int, end_us: int, tenant_id: str, rollups: bool) -> dict[str, list[int]]:
    """Per api key over [start, end): [hours with events, total cost], summed in SQL."""
    edges, whole = split(start_us, end_us, rollups)
    where = " AND tenant_id = ?" if tenant_id else ""
    extra = [tenant_id] if tenant_id else []
    found: list[Row] = []
    if whole is not None:
        found += tx.all("SELECT api_key_id, COUNT(DISTINCT hour_us), SUM(cost_micros) FROM usage_hours"
                        f" WHERE hour_us >= ? AND hour_us < ?{where} GROUP BY api_key_id", [*whole, *extra])
    for lo, hi in edges:
        found += tx.all(f"SELECT api_key_id, COUNT(DISTINCT end_us / {HOUR_US}), SUM(cost_micros) FROM events"
                        f" WHERE end_us >= ? AND end_us < ?{where} GROUP BY api_key_id", [lo, hi, *extra])
    out: dict[str, list[int]] = {}
    for key, hours, cost in found:  # the sources' hours are disjoint: their counts add up
        sums = out.setdefault(str(key), [0, 0])
        sums[0] += int(hours)
        sums[1] += int(cost)
    return out


def anomalous_keys(tx: Tx, q: ReportQuery, rule: AnomalyRule, rollups: bool = True,
                   memo: BurstMemo | None = None, hours: dict[str, dict[int, Sums]] | None = None) -> set[str]:
    """The keys flagged in the window; `hours` is `key_hours` of it when the caller has it already."""
    if hours is None:
        hours = key_hours(tx, q.start_us, q.end_us, q.tenant_id, rollups)
    flagged = _bursting(tx, q, rule, hours, memo)
    history = _history(tx, q.start_us - HISTORY_US, q.start_us, q.tenant_id, rollups)
    for key, by_hour in hours.items():
        past_hours, past_cost = history.get(key, (0, 0))
        if past_hours < 3:
            continue
        mean = past_cost // past_hours
        if any(s[1] * 1000 > mean * rule.hourly_factor_permille for s in by_hour.values()):
            flagged.add(key)
    return flagged


def build(tx: Tx, q: ReportQuery, rule: AnomalyRule, rollups: bool = True,
          memo: BurstMemo | None = None) -> tuple[list[ReportRow], ReportRow]:
    """The report; `rollups=False` scans the events alone (the reference the rollups are tested against).

    One pass over rollups and edge events per hour (a minute for minute buckets) and key gives both the
    rows and each key's hours for the anomaly rules.
    """
    check_query(q)
    columns = ["api_key_id"] + [COLUMNS[d] for d in q.group_by if d != "api_key"]
    minute = q.granularity == "minute"
    found = _sources(tx, q.start_us, q.end_us, q.tenant_id, ", ".join(columns), rollups and not minute,
                     GRANULARITY_US["minute"] if minute else HOUR_US)
    rows: dict[tuple[int, tuple[str, ...]], ReportRow] = {}
    hours: dict[str, dict[int, Sums]] = defaultdict(dict)
    groups: dict[tuple[object, ...], tuple[str, dict[str, str], tuple[str, ...]]] = {}
    tag_sets: dict[str, str] = {}
    width = len(columns)
    for record in found:
        dims = record[1:1 + width]
        known = groups.get(dims)
        if known is None:
            values = dict(zip(columns, dims, strict=True))
            group = {}
            for dim in q.group_by:
                value = values[COLUMNS[dim]]
                if dim == "status":
                    value = STATUS_NAMES.get(int(value), str(value))
                elif dim == "source":
                    value = SOURCE_NAMES.get(int(value), str(value))
                elif dim == "tag":
                    text = str(value)
                    if text not in tag_sets:
                        tag_sets[text] = json.loads(text).get(q.tag_key, "")
                    value = tag_sets[text]
                group[dim] = str(value)
            known = groups[dims] = (str(values["api_key_id"]), group, tuple(group.values()))
        key, group, _ = known
        t = int(record[0])
        ident = (_bucket(t, q) if q.granularity else q.start_us, known[2])
        row = rows.get(ident)
        if row is None:
            row = rows[ident] = ReportRow(ident[0], dict(group))
        requests, cost = int(record[-5]), int(record[-1])
        prompt, completion, cached = int(record[-4]), int(record[-3]), int(record[-2])
        row.requests += requests
        row.prompt_tokens += prompt
        row.completion_tokens += completion
        row.cost_micros += cost
        row.cached_requests += cached
        row.keys.add(key)
        sums = hours[key].setdefault(t - t % HOUR_US, [0, 0])
        sums[0] += requests
        sums[1] += cost
    flagged = anomalous_keys(tx, q, rule, rollups, memo, hours)
    result = sorted(rows.values(), key=lambda r: (r.bucket_start_us, tuple(r.group.values())))
    if q.top_n:
        by_group: dict[tuple[str, ...], int] = defaultdict(int)
        for row in result:
            by_group[tuple(row.group.values())] += row.cost_micros
        keep = set(sorted(by_group, key=lambda g: (-by_group[g], g))[: q.top_n])
        result = [r for r in result if tuple(r.group.values()) in keep]
    total = ReportRow(q.start_us, {})
    for row in result:
        row.anomalous = bool(row.keys & flagged)
        total.requests += row.requests
        total.prompt_tokens += row.prompt_tokens
        total.completion_tokens += row.completion_tokens
        total.cost_micros += row.cost_micros
        total.cached_requests += row.cached_requests
        total.anomalous = total.anomalous or row.anomalous
    return result, total
