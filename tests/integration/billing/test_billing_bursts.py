"""The burst rule's table on SQLite and PostgreSQL: rolled with the rollups it equals the runs a scan of the
events finds (runs across hour boundaries, late events in old hours, events after the mark), reports flag
the keys a scan flags, and a billing started with another rule answers from the events until its roll
rebuilds the table for that rule."""

from __future__ import annotations

import random
import time
from collections import defaultdict

from services.billing import reports, rollups
from services.billing.config import BillingConfig
from services.billing.model import UsageEvent
from services.billing.service import Billing
from services.billing.store import open_store
from services.common.pricing import Price

US, HOUR_US = 1_000_000, 3_600_000_000


def expected_bursts(events: list[UsageEvent], n: int, window_s: int) -> list[tuple[int, ...]]:
    """(hour, tenant, key, latest first request, earliest last request) of the runs, computed here."""
    ends: dict[tuple[str, str], list[int]] = defaultdict(list)
    for e in events:
        ends[(e.tenant_id, e.api_key_id)].append(e.end_us)
    found: dict[tuple[int, str, str], list[int]] = {}
    for (tenant, key), times in ends.items():
        times.sort()
        for i in range(n, len(times)):
            first, last = times[i - n], times[i]
            if last - first < window_s * US:
                got = found.setdefault((first // HOUR_US * HOUR_US, tenant, key), [first, last])
                got[0], got[1] = max(got[0], first), min(got[1], last)
    return sorted((h, t, k, *v) for (h, t, k), v in found.items())  # type: ignore[misc]


def bursty(rng: random.Random, since: int, hours: int, tag: str, count: int) -> list[UsageEvent]:
    out = []
    for b in range(count):
        hour = since + rng.randrange(0, hours) * HOUR_US
        at = hour - 8 * US + rng.randrange(0, 16 * US) if b % 2 else hour + rng.randrange(0, HOUR_US)
        tenant, key = rng.choice([("t0", "k0"), ("t0", "k1"), ("t1", "k2"), ("t1", "k0")])  # k0: two tenants
        step = rng.choice([60_000, 150_000, 220_000])
        out += [UsageEvent(f"{tag}{b}-{i}", tenant, key, "m0", end_us=at + i * step, prompt_tokens=5)
                for i in range(rng.randint(35, 65))]
    for i in range(300):
        tenant, key = rng.choice([("t0", "k0"), ("t0", "k1"), ("t1", "k2"), ("t1", "k3")])
        out.append(UsageEvent(f"{tag}q{i}", tenant, key, "m0", end_us=since + rng.randrange(0, hours * HOUR_US)))
    rng.shuffle(out)
    return out


async def open_billing(database: str, n: int = 50, window_s: int = 10) -> Billing:
    store = open_store(database)
    await store.open()
    return Billing(store, BillingConfig(database=database, operator_token="x" * 24, anomaly_max_requests=n,
                                        anomaly_window_s=window_s))


async def table(billing: Billing) -> list[tuple[int, ...]]:
    rows = await billing.store.read(lambda tx: tx.all("SELECT * FROM usage_key_bursts ORDER BY 1, 2, 3"))
    return [tuple(int(v) if not isinstance(v, str) else v for v in r) for r in rows]  # type: ignore[misc]


async def assert_reports_flag_what_a_scan_flags(billing: Billing, since: int, hours: int) -> None:
    rng = random.Random(9)
    windows = [(since, since + hours * HOUR_US), (since + 1, since + hours * HOUR_US - 1)]
    windows += [(s, s + rng.randrange(HOUR_US, 9 * HOUR_US)) for s in
                (since + rng.randrange(0, hours * HOUR_US) for _ in range(14))]
    for start, end in windows:
        for tenant in ("", "t0"):
            q = reports.ReportQuery(start, end, group_by=("api_key",), tenant_id=tenant)
            fast = await billing.report(q)
            slow = await billing.store.read(lambda tx, q=q: reports.build(tx, q, billing.anomaly_rule, rollups=False))
            assert fast == slow, (start - since, end - since, tenant)


async def test_the_burst_table_follows_rolls_late_events_and_a_rule_change(database: str) -> None:
    rng = random.Random(18)
    since = (time.time_ns() // 1000 // HOUR_US - 30) * HOUR_US
    billing = await open_billing(database)
    try:
        await billing.create_price(Price("", "m0", "", 1000, 1000, None, 1), "test")
        events = bursty(rng, since, 24, "a", 30)
        for i in range(0, len(events), 200):  # rolls between batches: runs split across rolls
            assert not [o for o in await billing.record_many(events[i:i + 200]) if isinstance(o, Exception)]
            await billing.store.write(rollups.roll)  # the table too at every roll
        assert await table(billing) == expected_bursts(events, 50, 10) and len(await table(billing)) > 8
        late = bursty(rng, since, 24, "late", 6)  # late events in old hours, some after the mark
        assert not [o for o in await billing.record_many(late) if isinstance(o, Exception)]
        await billing.store.write(rollups.roll)
        more = bursty(rng, since, 24, "after", 4)
        assert not [o for o in await billing.record_many(more) if isinstance(o, Exception)]
        assert await table(billing) == expected_bursts(events + late, 50, 10)
        await assert_reports_flag_what_a_scan_flags(billing, since, 24)  # with events after the mark
        await billing.roll_rollups()  # the roller's: the table waits for a few seconds' events
        assert await table(billing) == expected_bursts(events + late, 50, 10)
        await assert_reports_flag_what_a_scan_flags(billing, since, 24)
        await billing.store.write(rollups.roll)
        assert await table(billing) == expected_bursts(events + late + more, 50, 10)
    finally:
        await billing.close()
    strict = await open_billing(database, 30, 4)  # restarted with another rule
    try:
        await assert_reports_flag_what_a_scan_flags(strict, since, 24)  # the table is for (50, 10): unused
        await strict.roll_rollups()  # rebuilt at once for the new rule
        assert await table(strict) == expected_bursts(events + late + more, 30, 4)
        await assert_reports_flag_what_a_scan_flags(strict, since, 24)
        await strict.store.write(rollups.rebuild)
        assert await table(strict) == expected_bursts(events + late + more, 30, 4)
    finally:
        await strict.close()
