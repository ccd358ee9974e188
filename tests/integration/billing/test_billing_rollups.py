"""Hourly rollups over real gRPC, on SQLite and PostgreSQL: reports served from them equal a scan of the
events to the micro-unit, the events of every ingestion path are rolled into them (replays counted once),
and the migration builds them from the events an older ledger already holds."""

from __future__ import annotations

import asyncio
import random
import sqlite3
import time
from collections import defaultdict
from dataclasses import dataclass

import psycopg
import pytest

from autoglm.billing.v1 import billing_service_pb2 as pb2
from autoglm.billing.v1 import billing_service_pb2_grpc as pb2_grpc
from services.billing.config import BillingConfig
from services.billing.server import build_server
from services.billing.store import open_store
from services.common.config import ServerSettings
from tests.integration.billing.helpers import OPERATOR_TOKEN, operator, price_request, tenant_budget, ts, usage
from tests.waiting import wait_until

HOUR = 3600
STATUSES = {pb2.USAGE_STATUS_COMPLETED: "completed", pb2.USAGE_STATUS_CANCELLED: "cancelled",
            pb2.USAGE_STATUS_FAILED: "failed"}
GROUPINGS = {  # the report's dimensions and the event field each reads
    "tenant": [pb2.REPORT_DIMENSION_TENANT],
    "model+tenant": [pb2.REPORT_DIMENSION_MODEL, pb2.REPORT_DIMENSION_TENANT],
    "tag": [pb2.REPORT_DIMENSION_TAG],
    "api_key": [pb2.REPORT_DIMENSION_API_KEY],
    "model_version": [pb2.REPORT_DIMENSION_MODEL_VERSION],
    "status": [pb2.REPORT_DIMENSION_STATUS],
}
NAMES = {pb2.REPORT_DIMENSION_TENANT: "tenant", pb2.REPORT_DIMENSION_MODEL: "model",
         pb2.REPORT_DIMENSION_TAG: "tag", pb2.REPORT_DIMENSION_API_KEY: "api_key",
         pb2.REPORT_DIMENSION_MODEL_VERSION: "model_version", pb2.REPORT_DIMENSION_STATUS: "status"}
GRANULARITY = {pb2.GRANULARITY_UNSPECIFIED: 0, pb2.GRANULARITY_HOUR: HOUR, pb2.GRANULARITY_DAY: 86400}


@dataclass
class Sent:
    event: pb2.UsageEvent
    cost: int


def random_events(rng: random.Random, count: int, since: float, hours: int) -> list[pb2.UsageEvent]:
    events = []
    for i in range(count):
        tags = rng.choice([{}, {"team": "search"}, {"team": "ads"}, {"team": "ads", "env": "prod"}, {"env": "dev"}])
        events.append(usage(f"ev{i}", prompt=rng.randint(0, 5000), completion=rng.randint(0, 3000),
                            tenant=f"t{rng.randint(0, 3)}", key=f"k{rng.randint(0, 5)}", model=rng.choice(["m0", "m1"]),
                            end=since + rng.uniform(0, hours * HOUR), model_version=rng.choice(["", "v1", "v2"]),
                            status=rng.choice(list(STATUSES)), cached=rng.random() < 0.1, tags=tags))
    return events


async def ingest_by_every_path(stub: pb2_grpc.BillingServiceStub, events: list[pb2.UsageEvent],
                               rng: random.Random) -> dict[str, Sent]:
    """RecordUsage, batched and single StreamUsage, Reserve+Settle and lease-named events, with replays."""
    await stub.CreateBudget(tenant_budget("t0", micros=10**15))
    (lease,) = (await stub.AcquireLeases(pb2.AcquireLeasesRequest(router_id="r1", tenant_id="t0",
                                                                  api_key_id="k0"))).leases
    sent: dict[str, Sent] = {}
    quarter = len(events) // 4
    unary, streamed, settled, leased = (events[:quarter], events[quarter:2 * quarter],
                                        events[2 * quarter:3 * quarter], events[3 * quarter:])
    for event in unary:
        sent[event.event_id] = Sent(event, (await stub.RecordUsage(pb2.RecordUsageRequest(event=event))).cost.micros)
    requests = [pb2.StreamUsageRequest(events=streamed[i:i + 40]) for i in range(0, len(streamed), 40)]
    requests.append(pb2.StreamUsageRequest(event=streamed[0]))  # a replay, one per message
    replies = [reply async for reply in stub.StreamUsage(iter(requests))]
    acks = [ack for reply in replies for ack in (reply.acks or [reply])]
    for event, ack in zip(streamed, acks, strict=False):
        assert not ack.error_code, ack.error_message
        sent[event.event_id] = Sent(event, ack.cost.micros)
    for event in settled:
        hold = await stub.Reserve(pb2.ReserveRequest(tenant_id=event.tenant_id, api_key_id=event.api_key_id,
                                                     model=event.model, max_prompt_tokens=event.prompt_tokens,
                                                     max_completion_tokens=event.completion_tokens,
                                                     request_id=f"req-{event.event_id}"))
        reply = await stub.Settle(pb2.SettleRequest(hold_id=hold.hold_id, event=event))
        sent[event.event_id] = Sent(event, reply.cost.micros)
    for event in leased:
        named = pb2.UsageEvent()
        named.CopyFrom(event)
        if named.tenant_id == "t0":
            named.lease_ids.append(lease.lease_id)
        reply = await stub.RecordUsage(pb2.RecordUsageRequest(event=named))
        sent[event.event_id] = Sent(named, reply.cost.micros)
    for event in rng.sample(events, len(events) // 10):  # replays with other numbers count for nothing
        again = pb2.UsageEvent()
        again.CopyFrom(event)
        again.prompt_tokens += 1
        assert (await stub.RecordUsage(pb2.RecordUsageRequest(event=again))).duplicate
    return sent


def expected(sent: dict[str, Sent], start: float, end: float, grouping: list[int], tag_key: str,
             step: int) -> dict[tuple[int, tuple[tuple[str, str], ...]], tuple[int, int, int, int, int]]:
    """The report a scan of the sent events gives: (bucket, group) -> requests, tokens, cached, cost."""
    sums: dict[tuple[int, tuple[tuple[str, str], ...]], list[int]] = defaultdict(lambda: [0, 0, 0, 0, 0])
    lo, hi = int(start * 1_000_000), int(end * 1_000_000)
    for item in sent.values():
        e = item.event
        end_us = e.end_time.ToMicroseconds()
        if not lo <= end_us < hi:
            continue
        values = {"tenant": e.tenant_id, "model": e.model, "tag": e.tags.get(tag_key, ""), "api_key": e.api_key_id,
                  "model_version": e.model_version, "status": STATUSES[e.status]}
        bucket = end_us // 1_000_000 // step * step if step else int(start)
        row = sums[(bucket, tuple(sorted((NAMES[d], values[NAMES[d]]) for d in grouping)))]
        for i, value in enumerate((1, e.prompt_tokens, e.completion_tokens, int(e.cached), item.cost)):
            row[i] += value
    return {k: tuple(v) for k, v in sums.items()}  # type: ignore[misc]


def reported(reply: pb2.GetUsageReportResponse) -> dict[tuple[int, tuple[tuple[str, str], ...]],
                                                        tuple[int, int, int, int, int]]:
    return {(row.bucket_start.seconds, tuple(sorted(row.group.items()))):
            (row.requests, row.prompt_tokens, row.completion_tokens, row.cached_requests, row.cost.micros)
            for row in reply.rows}


async def test_reports_from_rollups_equal_a_scan_of_the_events_to_the_micro_unit(billing) -> None:
    rng = random.Random(18)
    now = time.time()
    since = (now // HOUR - 60) * HOUR + 0.5
    events = random_events(rng, 1200, since, 58)
    async with operator(billing) as chan:
        stub = pb2_grpc.BillingServiceStub(chan)
        for model in ("m0", "m1"):
            await stub.CreatePrice(price_request(model=model, effective=since - 86400, input=1_234_567,
                                                 output=7_654_321))
        sent = await ingest_by_every_path(stub, events, rng)
        windows = [(since - 10, now + 60),  # everything
                   (since + 7 * HOUR + 1234.567891, since + 50 * HOUR - 77.25),  # edges inside hours
                   (since + 20 * HOUR - 0.5, since + 30 * HOUR - 0.5),  # edges on hour boundaries
                   (since + 3 * HOUR + 10, since + 3 * HOUR + 2000)]  # inside one hour
        for start, end in windows:
            for name, grouping in GROUPINGS.items():
                for granularity, step in GRANULARITY.items():
                    reply = await stub.GetUsageReport(pb2.GetUsageReportRequest(
                        start_time=ts(start), end_time=ts(end), group_by=grouping, tag_key="team",
                        granularity=granularity))
                    want = expected(sent, start, end, grouping, "team", step)
                    assert reported(reply) == want, (name, granularity, start - since, end - since)
                    assert reply.total.cost.micros == sum(v[4] for v in want.values())
    assert sum(s.cost for s in sent.values()) > 0 and len(sent) == len(events)


def ledger_rows(database: str, sql: str) -> list[tuple[object, ...]]:
    if database.startswith("sqlite:///"):
        with sqlite3.connect(database.removeprefix("sqlite:///")) as conn:
            return [tuple(r) for r in conn.execute(sql).fetchall()]
    with psycopg.connect(database) as conn:
        return [tuple(int(v) if not isinstance(v, str) else v for v in r) for r in conn.execute(sql).fetchall()]


HOUR_OF = "end_us / 3600000000 * 3600000000"
SUMS = "COUNT(*), SUM(prompt_tokens), SUM(completion_tokens), SUM(cached), SUM(cost_micros)"
ROLLED = "requests, prompt_tokens, completion_tokens, cached_requests, cost_micros"
# Each rollup table against the same sums from a scan of the events (tags: a row per tag of an event).
TABLES = {
    "usage_hours_by_model": ("hour_us, tenant_id, model, model_version, status, source",
                             f"{HOUR_OF}, tenant_id, model, model_version, status, source", "events"),
    "usage_hours_by_key": ("hour_us, tenant_id, api_key_id", f"{HOUR_OF}, tenant_id, api_key_id", "events"),
    "usage_hours_by_tag": ("hour_us, tenant_id, tag_key, tag_value", f"{HOUR_OF}, tenant_id, t.key, t.value", None),
}
TAG_PAIRS = {"sqlite": "events, json_each(events.tags_json) AS t",
             "postgres": "events CROSS JOIN LATERAL jsonb_each_text(events.tags_json::jsonb) AS t"}


def compared(database: str) -> list[tuple[list[tuple[object, ...]], list[tuple[object, ...]]]]:
    """(the rollup table's rows, the scan's rows) for each table, the key groups and the keys' days."""
    dialect = "sqlite" if database.startswith("sqlite:///") else "postgres"
    out = []
    for table, (keys, scanned, source) in TABLES.items():
        width = len(keys.split(", "))
        order = ", ".join(str(i + 1) for i in range(width))
        out.append((ledger_rows(database, f"SELECT {keys}, {ROLLED} FROM {table} ORDER BY {order}"),
                    ledger_rows(database, f"SELECT {scanned}, {SUMS} FROM {source or TAG_PAIRS[dialect]}"
                                          f" GROUP BY {scanned} ORDER BY {order}")))
    groups = "api_key_id, hour_us, tenant_id, model, model_version, status, tags_json, source"
    out.append((ledger_rows(database, f"SELECT {groups} FROM usage_key_groups ORDER BY 1, 2, 3, 4, 5, 6, 7, 8"),
                ledger_rows(database, f"SELECT DISTINCT {groups.replace('hour_us', HOUR_OF)} FROM events"
                                      " ORDER BY 1, 2, 3, 4, 5, 6, 7, 8")))
    day = 24 * 3600000000
    out.append((ledger_rows(database, "SELECT day_us, tenant_id, api_key_id, hours, requests, cost_micros"
                                      " FROM usage_days_by_key ORDER BY 1, 2, 3"),
                ledger_rows(database, f"SELECT end_us / {day} * {day}, tenant_id, api_key_id, COUNT(DISTINCT"
                                      f" {HOUR_OF}), COUNT(*), SUM(cost_micros) FROM events GROUP BY 1, 2, 3"
                                      " ORDER BY 1, 2, 3")))
    return out


def runs(ends: list[tuple[object, ...]], n: int, window_s: int) -> list[tuple[object, ...]]:
    """(hour, tenant, key, latest first request, earliest last request) of the runs of more than `n` requests
    within `window_s` among (tenant, key, end_us) rows sorted by them."""
    found: dict[tuple[int, str, str], list[int]] = {}
    for i in range(n, len(ends)):
        (tenant, key, first), (*same, last) = ends[i - n], ends[i]
        if same == [tenant, key] and int(last) - int(first) < window_s * 1_000_000:  # type: ignore[call-overload]
            hour = int(first) // 3_600_000_000 * 3_600_000_000  # type: ignore[call-overload]
            got = found.setdefault((hour, str(tenant), str(key)), [int(first), int(last)])  # type: ignore[call-overload]
            got[0], got[1] = max(got[0], int(first)), min(got[1], int(last))  # type: ignore[call-overload]
    return [(h, t, k, *v) for (h, t, k), v in sorted(found.items())]


def rolled_up(database: str) -> bool:
    """Whether the roller has rolled every event recorded so far."""
    return ledger_rows(database, "SELECT seq FROM rollup_mark")[0][0] == \
        ledger_rows(database, "SELECT COALESCE(MAX(seq), 0) FROM events")[0][0]


async def test_every_ingestion_path_adds_to_the_rollups_once_per_event(billing, database: str) -> None:
    rng = random.Random(5)
    since = (time.time() // HOUR - 6) * HOUR + 0.25
    events = random_events(rng, 200, since, 5)
    async with operator(billing) as chan:
        stub = pb2_grpc.BillingServiceStub(chan)
        for model in ("m0", "m1"):
            await stub.CreatePrice(price_request(model=model, effective=since - 86400))
        sent = await ingest_by_every_path(stub, events, rng)
        await wait_until(lambda: rolled_up(database), 30, "the roller rolls every event into the rollups")
    for table, scan in compared(database):
        assert table == scan and table
    by_key = compared(database)[1][0]
    assert sum(int(r[3]) for r in by_key) == len(sent) == 200  # type: ignore[call-overload]
    assert sum(int(r[7]) for r in by_key) == sum(s.cost for s in sent.values())  # type: ignore[call-overload]


async def test_the_migration_builds_rollups_from_the_events_already_recorded(serve, database: str) -> None:
    rng = random.Random(7)
    since = (time.time() // HOUR - 30) * HOUR + 0.75
    events = random_events(rng, 300, since, 28)
    events += [usage(f"burst{i}", tenant="t1", key="k1", model="m0", end=since + 5 * HOUR - 3 + i * 0.1)
               for i in range(60)]  # a burst across an hour's start
    config = BillingConfig(server=ServerSettings(port=0), database=database, operator_token=OPERATOR_TOKEN)
    running = await serve(build_server(config))
    async with operator(running) as chan:
        stub = pb2_grpc.BillingServiceStub(chan)
        for model in ("m0", "m1"):
            await stub.CreatePrice(price_request(model=model, effective=since - 86400))
        sent = await ingest_by_every_path(stub, events, rng)
    await running.stop(grace=0)
    store = open_store(database)  # the ledger as it was before rollups existed
    await store.open()
    await store.write(lambda tx: [tx.execute(sql) for sql in (
        "DROP TABLE usage_hours_by_model", "DROP TABLE usage_hours_by_key", "DROP TABLE usage_hours_by_tag",
        "DROP TABLE usage_key_groups", "DROP TABLE rollup_mark",
        "CREATE TABLE usage_hours (hour_us BIGINT)", "DROP INDEX events_time_key",
        "CREATE INDEX events_time ON events (end_us)", "DELETE FROM schema_migrations WHERE version = 5",
        "DROP TABLE usage_key_bursts", "DROP TABLE usage_burst_rule", "DROP TABLE usage_key_tenants",
        "DELETE FROM schema_migrations WHERE version = 6", "DROP TABLE usage_days_by_key",
        "DELETE FROM schema_migrations WHERE version = 7")])
    await store.close()
    running = await serve(build_server(config))  # migrations 5 to 7 run again
    for table, scan in compared(database):
        assert table == scan and table
    ends = ledger_rows(database, "SELECT tenant_id, api_key_id, end_us FROM events ORDER BY 1, 2, 3")
    assert ledger_rows(database, "SELECT * FROM usage_key_bursts ORDER BY 1, 2, 3") == runs(ends, 50, 10)
    assert runs(ends, 50, 10) and ledger_rows(database, "SELECT max_requests, window_s FROM usage_burst_rule") == \
        [(50, 10)]
    start, end = since + 2 * HOUR + 99.5, since + 25 * HOUR + 1.5
    async with operator(running) as chan:
        reply = await pb2_grpc.BillingServiceStub(chan).GetUsageReport(pb2.GetUsageReportRequest(
            start_time=ts(start), end_time=ts(end), group_by=GROUPINGS["model+tenant"],
            granularity=pb2.GRANULARITY_HOUR))
    assert reported(reply) == expected(sent, start, end, GROUPINGS["model+tenant"], "", HOUR)


@pytest.mark.parametrize("grouping", ["tenant", "tag"])
async def test_whole_hours_are_read_from_the_rollups(billing, database: str, grouping: str) -> None:
    """Events of whole hours removed from the events table behind billing's back still count (the
    rollups answer for them); those of the partial edge hours do not (the events answer for them)."""
    rng = random.Random(11)
    since = (time.time() // HOUR - 10) * HOUR
    events = random_events(rng, 200, since, 8)
    async with operator(billing) as chan:
        stub = pb2_grpc.BillingServiceStub(chan)
        for model in ("m0", "m1"):
            await stub.CreatePrice(price_request(model=model, effective=since - 86400))
        sent = await ingest_by_every_path(stub, events, rng)
        await wait_until(lambda: rolled_up(database), 30, "the roller rolls every event into the rollups")
        ledger_write(database, "DELETE FROM events")
        start, end = since + 1800, since + 6 * HOUR + 1800
        reply = await stub.GetUsageReport(pb2.GetUsageReportRequest(
            start_time=ts(start), end_time=ts(end), group_by=GROUPINGS[grouping], tag_key="team"))
    whole = expected(sent, since + HOUR, since + 6 * HOUR, GROUPINGS[grouping], "team", 0)
    assert {g: v for (_, g), v in reported(reply).items()} == {g: v for (_, g), v in whole.items()}


def ledger_write(database: str, sql: str) -> None:
    if database.startswith("sqlite:///"):
        with sqlite3.connect(database.removeprefix("sqlite:///")) as conn:
            conn.execute(sql)
        return
    with psycopg.connect(database, autocommit=True) as conn:
        conn.execute(sql)


async def test_rolls_during_concurrent_ingestion_miss_no_event(database: str) -> None:
    """Writers commit out of seq order on PostgreSQL: a roll never moves its mark past an event that has
    yet to commit (it would be left out of the rollups and of every report after)."""
    from services.billing.model import UsageEvent
    from services.billing.service import Billing
    from services.common.pricing import Price

    store = open_store(database)
    await store.open()
    billing = Billing(store, BillingConfig(database=database, operator_token=OPERATOR_TOKEN))
    try:
        await billing.create_price(Price("", "m0", "", 1_234_567, 7_654_321, None, 1), "test")
        rng = random.Random(3)
        now_us = int(time.time() * 1_000_000)
        events = [UsageEvent(f"c{i}", f"t{rng.randint(0, 3)}", f"k{rng.randint(0, 9)}", "m0",
                             tags=rng.choice([{}, {"team": "a"}, {"team": "b", "env": "x"}]),
                             prompt_tokens=rng.randint(1, 900), completion_tokens=rng.randint(1, 90),
                             end_us=now_us - rng.randint(0, 3 * 3600 * 1_000_000)) for i in range(2400)]
        done = False

        async def ingest(part: list[UsageEvent]) -> None:
            for i in range(0, len(part), 25):
                await billing.record_many(part[i:i + 25])

        async def roll_on() -> int:
            rolls = 0
            while not done:
                rolls += bool(await billing.roll_rollups())
            return rolls

        roller = asyncio.ensure_future(roll_on())
        await asyncio.gather(*(ingest(events[w::6]) for w in range(6)))
        done = True
        assert await roller > 1
        await billing.roll_rollups()
    finally:
        await billing.close()
    for table, scan in compared(database):
        assert table == scan and table
    assert sum(int(r[3]) for r in compared(database)[1][0]) == len(events)  # type: ignore[call-overload]


async def test_reports_on_postgres_plan_each_statement_for_its_bounds(postgres) -> None:
    """A report repeats the same statements with new bounds. Once one has run five times psycopg prepares it,
    and PostgreSQL may then run it with a generic plan, blind to its values: the burst check's list of keys is
    no longer hashed and the events after the rollups' mark look like hundreds of rows (at 1 M events a report
    went from about 100 ms to 600-900 ms). Reports plan every statement for its values."""
    from services.billing import reports
    from services.billing.model import UsageEvent
    from services.billing.service import Billing
    from services.common.pricing import Price

    database = postgres.create_database()
    with psycopg.connect(database, autocommit=True) as conn:  # as if the planner had chosen generic plans
        conn.execute(f"ALTER DATABASE {conn.info.dbname} SET plan_cache_mode = force_generic_plan")
    store = open_store(database, pool_size=1)  # every statement on one connection, so its prepared ones show
    await store.open()
    billing = Billing(store, BillingConfig(database=database, operator_token=OPERATOR_TOKEN))
    try:
        await billing.create_price(Price("", "m0", "", 1_000_000, 2_000_000, None, 1), "test")
        now_us = int(time.time() * 1_000_000)
        events = [UsageEvent(f"g{i}", f"t{i % 3}", f"k{i % 4}", "m0", prompt_tokens=10, completion_tokens=5,
                             end_us=now_us - 3 * 3600 * 1_000_000 + i * 1_000_000) for i in range(3 * 3600 // 10)]
        for i in range(0, len(events), 250):
            await billing.record_many(events[i:i + 250])
        await billing.roll_rollups()
        query = reports.ReportQuery(now_us - 86400 * 1_000_000, now_us + 1, ("tenant",))

        async def generic_plans() -> int:  # run so far on the connection by its prepared statements with values
            rows = await store.read(lambda tx: tx.all("SELECT COALESCE(SUM(generic_plans), 0) FROM pg_prepared_statements"
                                                      " WHERE cardinality(parameter_types) > 0"))
            return int(rows[0][0])

        before = await generic_plans()
        results = [await billing.report(query) for _ in range(15)]
        after = await generic_plans()
    finally:
        await billing.close()
    assert all(total.requests == len(events) for _, total in results)
    assert after == before
