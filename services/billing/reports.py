"""Usage reports: requests, tokens and cost over [start, end), grouped by dimensions and time buckets.

Anomalies are flagged per api key: more than `max_requests` requests within any `window_s` seconds, or an
hour whose spend exceeds `hourly_factor_permille`/1000 x the key's mean hourly spend over the 7 days before
the window (with at least 3 hours of history). A row is anomalous when any key counted in it is.
"""

from __future__ import annotations

import json
from collections import defaultdict, deque
from dataclasses import dataclass, field
from datetime import UTC, datetime

from services.billing.store.base import Tx
from services.common.errors import InvalidInput

US = 1_000_000
DIMENSIONS = ("tenant", "api_key", "model", "model_version", "tag", "status", "source")
STATUS_NAMES = {0: "unspecified", 1: "completed", 2: "cancelled", 3: "failed"}
# Who metered an event (services/billing/engine_usage.py): the router, or a replica's record billed instead.
SOURCE_NAMES = {0: "router", 1: "router", 2: "engine"}
GRANULARITY_US = {"minute": 60 * US, "hour": 3600 * US, "day": 86400 * US}
HISTORY_US = 7 * 86400 * US


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


def anomalous_keys(tx: Tx, q: ReportQuery, rule: AnomalyRule,
                   times: dict[str, list[int]], hourly: dict[str, dict[int, int]]) -> set[str]:
    flagged = set()
    window = rule.window_s * US
    for key, stamps in times.items():
        recent: deque[int] = deque()
        for t in sorted(stamps):
            recent.append(t)
            while recent[0] <= t - window:
                recent.popleft()
            if len(recent) > rule.max_requests:
                flagged.add(key)
                break
    sql = ("SELECT api_key_id, end_us / 3600000000, SUM(cost_micros) FROM events WHERE end_us >= ? AND end_us < ?"
           + (" AND tenant_id = ?" if q.tenant_id else "") + " GROUP BY api_key_id, end_us / 3600000000")
    params = [q.start_us - HISTORY_US, q.start_us] + ([q.tenant_id] if q.tenant_id else [])
    history: dict[str, list[int]] = defaultdict(list)
    for key, _hour, spend in tx.all(sql, params):
        history[key].append(int(spend))
    for key, hours in hourly.items():
        past = history.get(key, [])
        if len(past) < 3:
            continue
        mean = sum(past) // len(past)
        if any(spend * 1000 > mean * rule.hourly_factor_permille for spend in hours.values()):
            flagged.add(key)
    return flagged


def build(tx: Tx, q: ReportQuery, rule: AnomalyRule) -> tuple[list[ReportRow], ReportRow]:
    check_query(q)
    sql = ("SELECT tenant_id, api_key_id, model, model_version, tags_json, status, prompt_tokens, completion_tokens,"
           " cached, cost_micros, end_us, source FROM events WHERE end_us >= ? AND end_us < ?")
    params: list[object] = [q.start_us, q.end_us]
    if q.tenant_id:
        sql += " AND tenant_id = ?"
        params.append(q.tenant_id)
    rows: dict[tuple[int, tuple[str, ...]], ReportRow] = {}
    times: dict[str, list[int]] = defaultdict(list)
    hourly: dict[str, dict[int, int]] = defaultdict(lambda: defaultdict(int))
    for (tenant, key, model, version, tags_json, status, prompt, completion, cached, cost, end_us,
         source) in tx.all(sql, params):
        values = {"tenant": tenant, "api_key": key, "model": model, "model_version": version,
                  "status": STATUS_NAMES.get(int(status), str(status)),
                  "source": SOURCE_NAMES.get(int(source), str(source))}
        if "tag" in q.group_by:
            values["tag"] = json.loads(tags_json).get(q.tag_key, "")
        group = {dim: values[dim] for dim in q.group_by}
        ident = (_bucket(int(end_us), q), tuple(group[d] for d in q.group_by))
        row = rows.get(ident)
        if row is None:
            row = rows[ident] = ReportRow(ident[0], group)
        row.requests += 1
        row.prompt_tokens += int(prompt)
        row.completion_tokens += int(completion)
        row.cost_micros += int(cost)
        row.cached_requests += int(cached)
        row.keys.add(key)
        times[key].append(int(end_us))
        hourly[key][int(end_us) // (3600 * US)] += int(cost)
    flagged = anomalous_keys(tx, q, rule, times, hourly)
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
