"""Usage reports: requests, tokens and cost over [start, end), grouped by dimensions and time buckets.

Whole hours are read from the rollup table of the report's shape (`rollups`: by model, version, status,
source and tenant; by key and tenant; by tag and tenant) together with the events not rolled into it yet,
and the partial hours at the window's edges from the events (an edge over more than half its hour as the
hour's rollups less the events of the rest of it), all summed in SQL and folded here, so a report costs its
groups per hour and at most half an hour of events at each end, not the number of events; the result is
the same as a scan of the events (to the micro-unit). Minute buckets, and dimensions no one table holds (a
key with a model, say), come from the events alone.

Anomalies are flagged per api key: more than `max_requests` requests within any `window_s` seconds, or an
hour whose spend exceeds `hourly_factor_permille`/1000 x the key's mean hourly spend over the 7 days (168 whole
hours) before the window's first hour (with at least 3 hours of history; from `usage_days_by_key` for whole
UTC days and the hourly table around them). A row is anomalous when any key counted in it is: known from
the edge events, and for whole hours from `usage_key_groups`, read for the flagged keys only. Hourly counts
and spend come from `usage_hours_by_key`. Bursts (a key's request `max_requests` places earlier, within
`window_s`) starting in the whole hours and the partial hour before them come from `usage_key_bursts`, kept
by the rollups' roll (services/billing/bursts.py), and from the few events after its mark; near the window's
edges they are found in SQL in the events of the keys whose hourly counts allow one, every time.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

from services.billing import bursts
from services.billing import rollups as tables
from services.billing.rollups import DAY_US, HOUR_US
from services.billing.store.base import Row, Tx
from services.common.errors import InvalidInput

US = 1_000_000
DIMENSIONS = ("tenant", "api_key", "model", "model_version", "tag", "status", "source")
STATUS_NAMES = {0: "unspecified", 1: "completed", 2: "cancelled", 3: "failed"}
# Who metered an event (services/billing/engine_usage.py): the router, or a replica's record billed instead.
SOURCE_NAMES = {0: "router", 1: "router", 2: "engine"}
GRANULARITY_US = {"minute": 60 * US, "hour": 3600 * US, "day": 86400 * US}
HISTORY_US = 7 * 86400 * US
# Each dimension's column in `events` and the rollup tables (a tag is read from the tag set).
COLUMNS = {"tenant": "tenant_id", "api_key": "api_key_id", "model": "model", "model_version": "model_version",
           "tag": "tags_json", "status": "status", "source": "source"}
Sums = list[int]  # requests, prompt tokens, completion tokens, cached requests, cost
# The rollup table for reports by these dimensions (all of them: any dimension not listed scans events).
SHAPES = ((tables.BY_MODEL, frozenset({"tenant", "model", "model_version", "status", "source"})),
          (tables.BY_KEY, frozenset({"tenant", "api_key"})), (tables.BY_TAG, frozenset({"tenant", "tag"})))
# A rollup column's spelling in `events` (joined with its tags for the tag table).
IN_EVENTS = {"hour_us": f"end_us / {HOUR_US} * {HOUR_US}", "tag_key": "t.key", "tag_value": "t.value"}


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
    keys: set[str] = field(default_factory=set, repr=False, compare=False)  # the keys seen in its edge events


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


def shape_table(group_by: tuple[str, ...]) -> str | None:
    """The rollup table that holds every dimension of this grouping, or None (the events answer)."""
    for table, dims in SHAPES:
        if set(group_by) <= dims:
            return table
    return None


def _consistent(tx: Tx) -> None:
    """Every statement of this read sees one snapshot (rollups, their mark and the events agree)."""
    if tx.dialect == "postgres":
        tx.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        tx.execute("SET LOCAL jit = off")  # compiling a report's few small queries costs more than it saves
        # A report's statements repeat with new bounds, so psycopg prepares them; a generic plan would not see
        # that the events after the mark are few, nor hash the burst check's list of keys (10x slower).
        tx.execute("SET LOCAL plan_cache_mode = force_custom_plan")


def _events(tx: Tx, columns: list[str], lo: int, hi: int, tenant_id: str, step: int, *, after: int | None = None,
            tag_key: str | None = None, keys: list[str] | None = None) -> list[Row]:
    """Rows of (time, <columns>, requests, prompt, completion, cached, cost) over events ending in [lo, hi),
    summed in SQL per `columns` and, with `step`, per end time rounded down to it (else the time is 0).

    `after`: only the events after this seq (the ones not rolled up yet); `tag_key`: one row per event and
    tag of that key (`t.key`, `t.value`); `keys`: only these api keys.
    """
    conds, params = ["end_us >= ?", "end_us < ?"], list[object]([lo, hi])
    if after is not None:  # few rows after the mark: walk the seqs, not the times
        conds = ["+end_us >= ?", "+end_us < ?", "events.seq > ?"]
        params.append(after)
    _narrow(conds, params, tenant_id, "t.key", tag_key, keys)
    cols = ", ".join(columns)
    bucket = f"end_us / {step} * {step}" if step else "0"
    grouped = f"{bucket}, {cols}" if step else cols
    source = tables.EVENTS_BY_SEQ[tx.dialect] if after is not None else "events"
    if tag_key is not None:
        source = tables.TAG_PAIRS[tx.dialect].replace("events", source, 1)
    return tx.all(f"SELECT {bucket}, {cols}, COUNT(*), SUM(prompt_tokens), SUM(completion_tokens), SUM(cached),"
                  f" SUM(cost_micros) FROM {source} WHERE {' AND '.join(conds)} GROUP BY {grouped}", params)


def _narrow(conds: list[str], params: list[object], tenant_id: str, tag_column: str, tag_key: str | None,
            keys: list[str] | None) -> None:
    """Add a report's tenant, tag-key and api-key filters to a query's conditions (both sources name them alike,
    but for the tag key's column)."""
    if tenant_id:
        conds.append("tenant_id = ?")
        params.append(tenant_id)
    if tag_key is not None:
        conds.append(f"{tag_column} = ?")
        params.append(tag_key)
    if keys is not None:
        conds.append(f"api_key_id IN ({', '.join('?' * len(keys))})")
        params += keys


def _rolled(tx: Tx, table: str, columns: list[str], lo: int, hi: int, tenant_id: str, mark: int, by_hour: bool,
            *, tag_key: str | None = None, keys: list[str] | None = None) -> list[Row]:
    """Rows of (hour or 0, <columns>, requests, prompt, completion, cached, cost) over the whole hours
    [lo, hi): `table`'s rows and the events after its `mark`, summed in SQL per `columns` (the table's)."""
    conds, params = ["hour_us >= ?", "hour_us < ?"], list[object]([lo, hi])
    _narrow(conds, params, tenant_id, "tag_key", tag_key, keys)
    cols = ", ".join(columns)
    grouped = f"hour_us, {cols}" if by_hour else cols
    out = tx.all(f"SELECT {'hour_us' if by_hour else '0'}, {cols}, SUM(requests), SUM(prompt_tokens),"
                 f" SUM(completion_tokens), SUM(cached_requests), SUM(cost_micros) FROM {table}"
                 f" WHERE {' AND '.join(conds)} GROUP BY {grouped}", params)
    return out + _events(tx, [IN_EVENTS.get(c, c) for c in columns], lo, hi, tenant_id, HOUR_US if by_hour else 0,
                         after=mark, tag_key=tag_key, keys=keys)


def _key_hours(tx: Tx, lo: int, hi: int, tenant_id: str, mark: int,
               keys: list[str] | None = None) -> dict[str, dict[int, Sums]]:
    """Per api key, per whole hour in [lo, hi) with events: [requests, cost]."""
    found: dict[str, dict[int, Sums]] = defaultdict(dict)
    if lo < hi:
        for hour, key, requests, _p, _c, _cached, cost in _rolled(tx, tables.BY_KEY, ["api_key_id"], lo, hi,
                                                                  tenant_id, mark, True, keys=keys):
            sums = found[str(key)].setdefault(int(hour), [0, 0])
            sums[0] += int(requests)
            sums[1] += int(cost)
    return found


def _peaks(tx: Tx, lo: int, hi: int, tenant_id: str, mark: int, keys: list[str] | None) -> dict[str, int]:
    """Per api key, the cost of its costliest whole hour in [lo, hi): the maximum taken in SQL over the
    rollups, and for the keys with events after the mark, over their hours summed with those events."""
    late = {str(r[1]) for r in _events(tx, ["api_key_id"], lo, hi, tenant_id, 0, after=mark, keys=keys)}
    conds, params = ["hour_us >= ?", "hour_us < ?"], list[object]([lo, hi])
    _narrow(conds, params, tenant_id, "", None, keys)
    out = {str(key): int(top) for key, top in tx.all(
        f"SELECT api_key_id, MAX(cost) FROM (SELECT hour_us, api_key_id, SUM(cost_micros) AS cost FROM {tables.BY_KEY}"
        f" WHERE {' AND '.join(conds)} GROUP BY hour_us, api_key_id) AS hourly GROUP BY api_key_id", params)
        if str(key) not in late}
    if late:
        for key, by_hour in _key_hours(tx, lo, hi, tenant_id, mark, sorted(late)).items():
            out[key] = max(s[1] for s in by_hour.values())
    return out


def _merge(into: dict[str, dict[int, Sums]], more: dict[str, dict[int, Sums]]) -> None:
    for key, by_hour in more.items():
        mine = into.setdefault(key, {})
        for hour, sums in by_hour.items():
            got = mine.setdefault(hour, [0, 0])
            got[0] += sums[0]
            got[1] += sums[1]


def _burst_starts(tx: Tx, lo: int, hi: int, keys: list[str], tenant_id: str,
                  rule: AnomalyRule) -> dict[tuple[str, int], int]:
    """Per (key, hour of a run's first request), the latest first request of the runs of more than
    `max_requests` of these keys' requests within `window_s` seconds among the events ending in [lo, hi)."""
    where = "e.end_us >= ? AND e.end_us < ?" + (" AND e.tenant_id = ?" if tenant_id else "")
    where += f" AND e.api_key_id IN ({', '.join('?' * len(keys))})"
    rows = tx.all(bursts.runs((rule.max_requests, rule.window_s), "events AS e", where, per=("api_key_id",)),
                  [lo, hi, *([tenant_id] if tenant_id else []), *keys])
    return {(str(key), int(hour)): int(latest) for hour, key, latest, _end in rows}


def _count(by_hour: dict[int, Sums], lo: int, hi: int) -> int:
    return sum(by_hour[h][0] for h in range(lo - lo % HOUR_US, hi, HOUR_US) if h in by_hour)


def _bursting(tx: Tx, q: ReportQuery, rule: AnomalyRule, whole: tuple[int, int] | None,
              read: dict[str, dict[int, Sums]], mark: int) -> set[str]:
    """Keys with more than `max_requests` requests within `window_s` seconds inside the window.

    The runs that start in the whole hours, or in the partial hour before them (a run counts when it starts
    inside the window), and end before the whole hours do come from `usage_key_bursts` (services/billing/
    bursts.py) for the events up to the mark, and from the events after the mark within one window of them;
    any other burst lies within one window of the window's edges, read from the events every time, for the
    keys whose hourly counts there allow one. When the table was built for another rule (billing started
    with a new one and has not rolled since), the whole hours' events are checked instead, in one query; so
    are, in a report of all tenants, those of a key recorded under several (the table's runs are per tenant).
    `read`: per key and hour, the counts of the edge events.
    """
    n, window = rule.max_requests, rule.window_s * US
    flagged: set[str] = set()
    if whole is None:
        candidates = sorted(k for k, by_hour in read.items() if _count(by_hour, q.start_us, q.end_us) > n)
        if candidates:
            flagged |= {k for k, _hour in _burst_starts(tx, q.start_us, q.end_us, candidates, q.tenant_id, rule)}
        return flagged
    first, last = whole
    begin = first - HOUR_US if q.start_us < first and first + window <= min(last, q.end_us) else first
    ranges = [(max(last - window, q.start_us), q.end_us)]
    if begin == first:
        ranges.append((q.start_us, min(first + window, q.end_us)))
    head = min(-(-(first + window) // HOUR_US) * HOUR_US, last) if begin == first else first
    tail = max((last - window) // HOUR_US * HOUR_US, head)  # the hours near the end not read at the head
    near: dict[str, dict[int, Sums]] = defaultdict(dict)
    _merge(near, read)
    if begin == first:
        _merge(near, _key_hours(tx, first, head, q.tenant_id, mark))
    _merge(near, _key_hours(tx, tail, last, q.tenant_id, mark))
    for lo, hi in ranges:  # near the end: read every time
        candidates = sorted(k for k, by_hour in near.items() if lo < hi and _count(by_hour, lo, hi) > n)
        if candidates:
            flagged |= {key for key, _hour in _burst_starts(tx, lo, hi, candidates, q.tenant_id, rule)}

    def flag(starts: dict[tuple[str, int], int]) -> None:
        flagged.update(k for (k, hour), latest in starts.items() if hour >= first or latest >= q.start_us)

    kept = bursts.state(tx)
    if kept is None or kept[0] != (n, rule.window_s):  # the table is not (yet) for this rule: the events
        counts = _key_hours(tx, begin, last, q.tenant_id, mark)
        candidates = sorted(k for k, by_hour in counts.items() if _count(by_hour, begin, last) > n)
        if candidates:
            flag(_burst_starts(tx, begin, last, candidates, q.tenant_id, rule))
        return flagged
    flagged |= bursts.flagged(tx, begin, first, last, q.start_us, q.tenant_id)
    # The events after the table's last start or shorten only runs starting within one window before them.
    where, extra = (" AND tenant_id = ?", [q.tenant_id]) if q.tenant_id else ("", [])
    late = tx.all(f"SELECT api_key_id, MIN(end_us), MAX(end_us) FROM {tables.EVENTS_BY_SEQ[tx.dialect]}"
                  f" WHERE +end_us >= ? AND +end_us < ? AND events.seq > ?{where} GROUP BY api_key_id",
                  [begin, last, kept[1], *extra])
    if late:
        lo, hi = max(begin, min(int(r[1]) for r in late) - window), min(last, max(int(r[2]) for r in late) + window)
        flag(_burst_starts(tx, lo, hi, sorted(str(r[0]) for r in late), q.tenant_id, rule))
    if not q.tenant_id:  # the table's runs are per tenant and key: a key of several tenants is read here
        shared = bursts.shared_keys(tx)
        if shared:
            flag(_burst_starts(tx, begin, last, sorted(shared), q.tenant_id, rule))
    return flagged


def _history(tx: Tx, start_us: int, end_us: int, tenant_id: str, rollups: bool, mark: int) -> dict[str, list[int]]:
    """Per api key over the whole hours [start, end): [hours with events, total cost]. The whole UTC days
    come from the daily table and the hours around them from the hourly one; a key with events after the mark
    there (or, across tenants, a key of several tenants, whose days are per tenant) has its hours summed
    from the hourly table and those events instead."""
    where = " AND tenant_id = ?" if tenant_id else ""
    extra = [tenant_id] if tenant_id else []
    if not rollups:
        return {str(key): [int(hours), int(cost)] for key, hours, cost in tx.all(
            f"SELECT api_key_id, COUNT(DISTINCT end_us / {HOUR_US}), SUM(cost_micros) FROM events"
            f" WHERE end_us >= ? AND end_us < ?{where} GROUP BY api_key_id", [start_us, end_us, *extra])}
    first_day, last_day = -(-start_us // DAY_US) * DAY_US, end_us // DAY_US * DAY_US
    found: list[Row] = []
    hour_ranges = [(start_us, end_us)]
    if first_day < last_day:
        hour_ranges = [(a, b) for a, b in ((start_us, first_day), (last_day, end_us)) if a < b]
        found += tx.all(f"SELECT api_key_id, SUM(hours), SUM(cost_micros) FROM {tables.BY_KEY_DAYS}"
                        f" WHERE day_us >= ? AND day_us < ?{where} GROUP BY api_key_id", [first_day, last_day, *extra])
    for lo, hi in hour_ranges:
        found += tx.all(f"SELECT api_key_id, COUNT(DISTINCT hour_us), SUM(cost_micros) FROM {tables.BY_KEY}"
                        f" WHERE hour_us >= ? AND hour_us < ?{where} GROUP BY api_key_id", [lo, hi, *extra])
    out: dict[str, list[int]] = {}
    for key, hours, cost in found:  # the sources' hours are disjoint: their counts add up
        sums = out.setdefault(str(key), [0, 0])
        sums[0] += int(hours)
        sums[1] += int(cost)
    redo = {str(r[1]) for r in _events(tx, ["api_key_id"], start_us, end_us, tenant_id, 0, after=mark)}
    if not tenant_id:
        redo.update(bursts.shared_keys(tx))
    if redo:
        for key in redo:
            out.pop(key, None)
        for key, by_hour in _key_hours(tx, start_us, end_us, tenant_id, mark, sorted(redo)).items():
            out[key] = [len(by_hour), sum(s[1] for s in by_hour.values())]
    return out


def anomalous_keys(tx: Tx, q: ReportQuery, rule: AnomalyRule, rollups: bool = True,
                   read: tuple[list[tuple[int, int]], dict[str, dict[int, Sums]]] | None = None) -> set[str]:
    """The keys flagged in the window; `read`: the ranges the caller read from the events and, per key
    and hour, their [requests, cost] (the rest of the window is whole hours, read here from the rollups)."""
    if read is None:
        edges, whole = split(q.start_us, q.end_us, rollups)
        hours: dict[str, dict[int, Sums]] = defaultdict(dict)
        for lo, hi in edges:
            for hour, key, requests, *_sums, cost in _events(tx, ["api_key_id"], lo, hi, q.tenant_id, HOUR_US):
                _merge(hours, {str(key): {int(hour): [int(requests), int(cost)]}})
    else:
        edges, hours = read
        whole = split(q.start_us, q.end_us)[1] if edges != [(q.start_us, q.end_us)] else None
    mark = tables.mark(tx) if whole is not None or rollups else 0
    flagged = _bursting(tx, q, rule, whole, hours, mark)
    since = q.start_us - q.start_us % HOUR_US
    history = {k: v for k, v in _history(tx, since - HISTORY_US, since, q.tenant_id, rollups, mark).items()
               if v[0] >= 3}
    if not history:
        return flagged
    # The key's costliest hour in the window: of its edge hours, and of the whole hours (disjoint from them).
    peak = {key: max(s[1] for s in by_hour.values()) for key, by_hour in hours.items() if key in history}
    if whole is not None:
        for key, top in _peaks(tx, *whole, q.tenant_id, mark, sorted(history) if len(history) <= 500 else None).items():
            if key in history:
                peak[key] = max(peak.get(key, top), top)
    for key, top in peak.items():
        past_hours, past_cost = history[key]
        if top * 1000 > past_cost // past_hours * rule.hourly_factor_permille:
            flagged.add(key)
    return flagged


def _group(q: ReportQuery, raw: dict[str, object], tag_sets: dict[str, str]) -> dict[str, str]:
    """A row's group, from its dimensions' raw values (a tag as its tag set's JSON, or `tag_value`)."""
    group = {}
    for dim in q.group_by:
        value = raw[dim]
        if dim == "status":
            value = STATUS_NAMES.get(int(value), str(value))  # type: ignore[call-overload]
        elif dim == "source":
            value = SOURCE_NAMES.get(int(value), str(value))  # type: ignore[call-overload]
        elif dim == "tag" and "tag_value" not in raw:
            text = str(value)
            if text not in tag_sets:
                tag_sets[text] = json.loads(text).get(q.tag_key, "")
            value = tag_sets[text]
        group[dim] = str(value)
    return group


def build(tx: Tx, q: ReportQuery, rule: AnomalyRule, rollups: bool = True) -> tuple[list[ReportRow], ReportRow]:
    """The report; `rollups=False` scans the events alone (the reference the rollups are tested against)."""
    check_query(q)
    _consistent(tx)
    minute = q.granularity == "minute"
    table = shape_table(q.group_by) if rollups and not minute else None
    edges, whole = split(q.start_us, q.end_us, table is not None)
    rows: dict[tuple[int, tuple[str, ...]], ReportRow] = {}
    tag_sets: dict[str, str] = {}

    def fold(t: int, group: dict[str, str], record: Row, sign: int = 1) -> ReportRow:
        ident = (_bucket(t, q) if q.granularity else q.start_us, tuple(group.values()))
        row = rows.get(ident)
        if row is None:
            row = rows[ident] = ReportRow(ident[0], group)
        row.requests += sign * int(record[-5])
        row.prompt_tokens += sign * int(record[-4])
        row.completion_tokens += sign * int(record[-3])
        row.cached_requests += sign * int(record[-2])
        row.cost_micros += sign * int(record[-1])
        return row

    # The events: per key too, for the anomaly rules and to know which keys each row counts. An edge over
    # more than half its hour is that hour's rollups less the events of the rest of the hour (fewer).
    names = ["api_key", "tenant", *(d for d in q.group_by if d not in ("api_key", "tenant"))]
    columns = [COLUMNS[d] for d in names]
    hours: dict[str, dict[int, Sums]] = defaultdict(dict)
    groups: dict[tuple[object, ...], dict[str, str]] = {}
    mark = tables.mark(tx) if whole is not None else 0
    read: list[tuple[int, int, int]] = []  # (lo, hi, sign) of the event ranges
    complemented: list[tuple[int, int]] = []
    for lo, hi in edges:
        hour = lo - lo % HOUR_US
        if table is None or whole is None or 2 * (hi - lo) <= HOUR_US:
            read.append((lo, hi, 1))
            continue
        complemented.append((lo, hi))
        _fold_whole(tx, q, table, (hour, hour + HOUR_US), mark, tag_sets, fold)
        _merge(hours, _key_hours(tx, hour, hour + HOUR_US, q.tenant_id, mark))
        read += [(a, b, -1) for a, b in ((hour, lo), (hi, hour + HOUR_US)) if a < b]
    for lo, hi, sign in read:
        for record in _events(tx, columns, lo, hi, q.tenant_id, GRANULARITY_US["minute"] if minute else HOUR_US):
            dims = record[1:1 + len(columns)]
            group = groups.get(dims)
            if group is None:
                group = groups[dims] = _group(q, dict(zip(names, dims, strict=True)), tag_sets)
            key, t = str(dims[0]), int(record[0])
            row = fold(t, dict(group), record, sign)
            if sign > 0:
                row.keys.add(key)
            sums = hours[key].setdefault(t - t % HOUR_US, [0, 0])
            sums[0] += sign * int(record[-5])
            sums[1] += sign * int(record[-1])
    for key in list(hours):  # the hours a complement emptied had no events of the key
        by_hour = {h: v for h, v in hours[key].items() if v[0]}
        if by_hour:
            hours[key] = by_hour
        else:
            del hours[key]
    hot: set[tuple[int, tuple[str, ...]]] = set()
    if table is not None and whole is not None:
        _fold_whole(tx, q, table, whole, mark, tag_sets, fold)
    for ident in [i for i, r in rows.items() if not r.requests]:  # groups only the complements had
        del rows[ident]
    flagged = anomalous_keys(tx, q, rule, rollups, (edges, hours))
    if flagged and table is not None and whole is not None:
        hot = _flagged_rows(tx, q, whole, mark, sorted(flagged), tag_sets)
        for lo, hi in complemented:
            for record in _events(tx, columns, lo, hi, q.tenant_id, HOUR_US, keys=sorted(flagged)):
                group = _group(q, dict(zip(names, record[1:1 + len(columns)], strict=True)), tag_sets)
                hot.add((_bucket(int(record[0]), q) if q.granularity else q.start_us, tuple(group.values())))
    result = sorted(rows.values(), key=lambda r: (r.bucket_start_us, tuple(r.group.values())))
    if q.top_n:
        by_group: dict[tuple[str, ...], int] = defaultdict(int)
        for row in result:
            by_group[tuple(row.group.values())] += row.cost_micros
        keep = set(sorted(by_group, key=lambda g: (-by_group[g], g))[: q.top_n])
        result = [r for r in result if tuple(r.group.values()) in keep]
    total = ReportRow(q.start_us, {})
    for row in result:
        row.anomalous = bool(row.keys & flagged) or (row.bucket_start_us, tuple(row.group.values())) in hot
        total.requests += row.requests
        total.prompt_tokens += row.prompt_tokens
        total.completion_tokens += row.completion_tokens
        total.cost_micros += row.cost_micros
        total.cached_requests += row.cached_requests
        total.anomalous = total.anomalous or row.anomalous
    return result, total


def _fold_whole(tx: Tx, q: ReportQuery, table: str, whole: tuple[int, int], mark: int, tag_sets: dict[str, str],
                fold: Callable[[int, dict[str, str], Row, int], ReportRow]) -> None:
    """Add the whole hours' sums from the rollup table `table` (and the events after its mark)."""
    by_hour = bool(q.granularity)
    if table != tables.BY_TAG:
        names = ["tenant", *(d for d in q.group_by if d != "tenant")]
        for record in _rolled(tx, table, [COLUMNS[d] for d in names], *whole, q.tenant_id, mark, by_hour):
            fold(int(record[0]), _group(q, dict(zip(names, record[1:1 + len(names)], strict=True)), tag_sets), record, 1)
        return
    # By tag: the rows with the tag, and as the tag's "" the total less them (events without it).
    untagged: dict[tuple[int, str], list[int]] = defaultdict(lambda: [0] * 5)
    for t, tenant, *sums in _rolled(tx, tables.BY_MODEL, ["tenant_id"], *whole, q.tenant_id, mark, by_hour):
        row = untagged[(int(t), str(tenant))]
        for i, value in enumerate(sums):
            row[i] += int(value)
    for record in _rolled(tx, tables.BY_TAG, ["tenant_id", "tag_value"], *whole, q.tenant_id, mark, by_hour,
                          tag_key=q.tag_key):
        t, tenant, value = int(record[0]), str(record[1]), str(record[2])
        if value == "":
            continue
        fold(t, _group(q, {"tenant": tenant, "tag": value, "tag_value": value}, tag_sets), record, 1)
        row = untagged[(t, tenant)]
        for i in range(5):
            row[i] -= int(record[3 + i])
    for (t, tenant), sums in untagged.items():
        if sums[0]:
            fold(t, _group(q, {"tenant": tenant, "tag": "", "tag_value": ""}, tag_sets), (t, *sums), 1)


def _flagged_rows(tx: Tx, q: ReportQuery, whole: tuple[int, int], mark: int, flagged: list[str],
                  tag_sets: dict[str, str]) -> set[tuple[int, tuple[str, ...]]]:
    """The (bucket, group) of every row of the whole hours that a flagged key counted in."""
    names = [d for d in q.group_by]
    columns = ["hour_us", *(COLUMNS[d] for d in names)]
    where = " AND tenant_id = ?" if q.tenant_id else ""
    marks = ", ".join("?" * len(flagged))
    found = [tuple(r) for r in tx.all(
        f"SELECT DISTINCT {', '.join(columns)} FROM {tables.KEY_GROUPS} WHERE api_key_id IN ({marks})"
        f" AND hour_us >= ? AND hour_us < ?{where}", [*flagged, *whole, *([q.tenant_id] if q.tenant_id else [])])]
    found += [r[:1 + len(names)] for r in _events(tx, [COLUMNS[d] for d in names] or ["tenant_id"], *whole,
                                                   q.tenant_id, HOUR_US, after=mark, keys=flagged)]
    out = set()
    for record in found:
        group = _group(q, dict(zip(names, record[1:1 + len(names)], strict=True)), tag_sets)
        t = int(record[0])
        out.add((_bucket(t, q) if q.granularity else q.start_us, tuple(group.values())))
    return out
