"""Usage report domain logic over a fake ledger: grouping, time buckets, top-N and the anomaly rules."""

from __future__ import annotations

from typing import Any

import pytest

from services.billing import bursts, reports, rollups
from services.billing.model import UsageEvent
from services.common.errors import InvalidInput
from services.common.usage import UsageStatus
from tests.unit.billing.fakes import T0, US, Ledger

HOUR = 3600 * US
RULE = reports.AnomalyRule(max_requests=50, window_s=10, hourly_factor_permille=3000)


def add(ledger: Ledger, event_id: str, tokens: int, at: int, key: str = "k1", model: str = "m",
        status: UsageStatus = UsageStatus.COMPLETED, tags: dict[str, str] | None = None) -> None:
    event = UsageEvent(event_id, "acme", key, model, tags=tags or {}, prompt_tokens=tokens, end_us=at, status=status)
    ledger.ingester.ingest(ledger.tx, [event], at)


def query(start: int = T0, end: int = T0 + 48 * HOUR, **kw: Any) -> reports.ReportQuery:
    return reports.ReportQuery(start_us=start, end_us=end, **kw)


def test_grouping_by_key_and_status_sums_requests_tokens_and_cost() -> None:
    ledger = Ledger()
    add(ledger, "1", 100, T0 + 1, key="a")
    add(ledger, "2", 200, T0 + 2, key="a", status=UsageStatus.CANCELLED)
    add(ledger, "3", 400, T0 + 3, key="b")
    add(ledger, "late", 800, T0 + 48 * HOUR, key="b")  # [start, end): outside
    rows, total = reports.build(ledger.tx, query(group_by=("api_key", "status")), RULE)
    assert [(r.group, r.requests, r.prompt_tokens, r.cost_micros) for r in rows] == [
        ({"api_key": "a", "status": "cancelled"}, 1, 200, 200),
        ({"api_key": "a", "status": "completed"}, 1, 100, 100),
        ({"api_key": "b", "status": "completed"}, 1, 400, 400)]
    assert (total.requests, total.cost_micros) == (3, 700)


def test_tag_grouping_and_hourly_buckets() -> None:
    ledger = Ledger()
    add(ledger, "1", 10, T0 + 5 * US, tags={"team": "search"})
    add(ledger, "2", 20, T0 + HOUR + 5 * US, tags={"team": "search"})
    add(ledger, "3", 40, T0 + HOUR + 6 * US, tags={"team": "ads"})
    add(ledger, "4", 80, T0 + HOUR + 7 * US)
    rows, _ = reports.build(ledger.tx, query(group_by=("tag",), tag_key="team", granularity="hour"), RULE)
    assert [(r.bucket_start_us - T0, r.group["tag"], r.prompt_tokens) for r in rows] == [
        (0, "search", 10), (HOUR, "", 80), (HOUR, "ads", 40), (HOUR, "search", 20)]


def test_month_granularity_starts_buckets_on_the_first() -> None:
    ledger = Ledger()
    add(ledger, "jan", 1, T0 + 10 * 24 * HOUR)
    add(ledger, "feb", 2, T0 + 40 * 24 * HOUR)
    rows, _ = reports.build(ledger.tx, query(end=T0 + 60 * 24 * HOUR, granularity="month"), RULE)
    assert [(r.bucket_start_us, r.prompt_tokens) for r in rows] == [(T0, 1), (T0 + 31 * 24 * HOUR, 2)]


def test_top_n_keeps_the_biggest_spenders_and_the_total_covers_them_only() -> None:
    ledger = Ledger()
    for n, (key, tokens) in enumerate((("a", 50), ("b", 500), ("c", 300), ("b", 1), ("d", 10))):
        add(ledger, f"e{n}", tokens, T0 + n, key=key)
    rows, total = reports.build(ledger.tx, query(group_by=("api_key",), top_n=2), RULE)
    assert [(r.group["api_key"], r.cost_micros) for r in rows] == [("b", 501), ("c", 300)]
    assert total.cost_micros == 801


@pytest.mark.parametrize(("requests", "flagged"), [(50, False), (51, True)])
def test_more_than_fifty_requests_in_ten_seconds_is_anomalous(requests: int, flagged: bool) -> None:
    ledger = Ledger()
    for n in range(requests):
        add(ledger, f"burst{n}", 1, T0 + n * (9 * US // requests), key="burst")
    for n in range(200):  # the same count spread out is fine
        add(ledger, f"calm{n}", 1, T0 + n * US, key="calm")
    rows, total = reports.build(ledger.tx, query(group_by=("api_key",)), RULE)
    assert {r.group["api_key"]: r.anomalous for r in rows} == {"burst": flagged, "calm": False}
    assert total.anomalous is flagged


def test_an_hour_far_above_the_keys_own_history_is_anomalous() -> None:
    ledger = Ledger()
    for hour in range(1, 6):  # five hours of history before the window, 100 micro-units an hour
        add(ledger, f"h{hour}", 100, T0 - hour * HOUR, key="steady")
        add(ledger, f"s{hour}", 100, T0 - hour * HOUR, key="spiky")
    add(ledger, "normal", 250, T0 + HOUR, key="steady")  # 2.5x its mean: under the 3x rule
    add(ledger, "spike", 301, T0 + HOUR, key="spiky")  # > 3x
    rows, _ = reports.build(ledger.tx, query(group_by=("api_key",)), RULE)
    assert {r.group["api_key"]: r.anomalous for r in rows} == {"steady": False, "spiky": True}


@pytest.mark.parametrize(("changes", "words"), [({"end": T0}, "after start_time"), ({"group_by": ("colour",)}, "unknown"),
                                                ({"group_by": ("tag",)}, "tag_key"), ({"granularity": "week"}, "week"),
                                                ({"top_n": -1}, "negative")])
def test_bad_queries_say_what_to_fix(changes: dict[str, Any], words: str) -> None:
    with pytest.raises(InvalidInput, match=words):
        reports.check_query(query(**changes))


def random_ledger(seed: int, events: int, hours: int) -> Ledger:
    """Keys with bursts, quiet keys and spiky hours, over `hours` hours around T0 (history before it)."""
    import random

    rng = random.Random(seed)
    ledger = Ledger()
    statuses = (UsageStatus.COMPLETED, UsageStatus.CANCELLED, UsageStatus.FAILED)
    for n in range(events):
        at = T0 - 9 * 24 * HOUR + rng.randrange(0, (hours + 9 * 24) * HOUR)
        add(ledger, f"r{n}", rng.randint(0, 900), at, key=f"k{rng.randint(0, 6)}", model=rng.choice(["m", "m"]),
            status=rng.choice(statuses), tags=rng.choice([{}, {"team": "a"}, {"team": "b", "env": "x"}]))
    for n in range(60):  # a burst across an hour boundary, and one big hour for another key
        add(ledger, f"burst{n}", 1, T0 + 5 * HOUR - 4 * US + n * 100_000, key="k1")
    add(ledger, "spike", 10**6, T0 + 7 * HOUR + 5, key="k2")
    return ledger


@pytest.fixture(scope="module", params=["half rolled up", "all rolled up"])
def busy_ledger(request: pytest.FixtureRequest) -> Ledger:
    """The whole hours come from the rollups and, for the events after their mark, from the events."""
    ledger = random_ledger(3, 2000, 30)
    rollups.roll(ledger.tx, limit=1000 if request.param == "half rolled up" else rollups.ROLL_LIMIT)
    assert rollups.mark(ledger.tx) == (1000 if request.param == "half rolled up" else 2061)
    return ledger


@pytest.mark.parametrize("granularity", ["", "minute", "hour", "day", "month"])
@pytest.mark.parametrize("group_by", [("tenant",), ("model", "tenant"), ("tag",), ("api_key",), ("model_version",),
                                      ("status",), ("api_key", "tag", "status")])
def test_reports_from_rollups_equal_a_scan_of_the_events(busy_ledger: Ledger, group_by: tuple[str, ...],
                                                          granularity: str) -> None:
    ledger = busy_ledger
    windows = [(T0 + 1, T0 + 30 * HOUR - 1), (T0 + 5 * HOUR - 2 * US, T0 + 9 * HOUR + 17), (T0, T0 + 24 * HOUR),
               (T0 + 5 * HOUR + 10, T0 + 5 * HOUR + 20 * US), (T0 + HOUR + 333, T0 + 2 * HOUR + 444)]
    for start, end in windows:
        for top_n in (0, 2):
            q = query(start, end, group_by=group_by, tag_key="team", granularity=granularity, top_n=top_n)
            fast, fast_total = reports.build(ledger.tx, q, RULE)
            slow, slow_total = reports.build(ledger.tx, q, RULE, rollups=False)
            assert fast == slow and fast_total == slow_total, (start - T0, end - T0, top_n)
    flagged = reports.anomalous_keys(ledger.tx, query(T0, T0 + 30 * HOUR), RULE)
    assert {"k1", "k2"} <= flagged


def bursty_ledger(seed: int) -> Ledger:
    """Runs of 40-70 requests over a few seconds at random times, many across an hour boundary, among quiet
    traffic, over 30 hours from T0 (and a day of history before)."""
    import random

    rng = random.Random(seed)
    ledger = Ledger()
    for n in range(600):
        add(ledger, f"q{n}", 1, T0 - 24 * HOUR + rng.randrange(0, 54 * HOUR), key=f"k{rng.randint(0, 4)}")
    for b in range(40):
        hour = T0 + rng.randrange(-2, 30) * HOUR
        at = hour - 12 * US + rng.randrange(0, 24 * US) if b % 2 else hour + rng.randrange(0, HOUR)
        key, size, step = f"k{rng.randint(0, 4)}", rng.randint(40, 70), rng.choice([50_000, 150_000, 250_000])
        for n in range(size):
            add(ledger, f"b{b}-{n}", 1, at + n * step, key=key)
    return ledger


def burst_rows(ledger: Ledger) -> list[tuple[Any, ...]]:
    return [tuple(r) for r in ledger.tx.all("SELECT * FROM usage_key_bursts ORDER BY 1, 2, 3")]


def windows() -> list[tuple[int, int]]:
    """Windows over whole hours, partial hours, hour boundaries and ends just after a burst's start."""
    import random

    rng = random.Random(7)
    out = [(T0, T0 + 30 * HOUR), (T0 + 1, T0 + 30 * HOUR - 1), (T0 + HOUR - 5 * US, T0 + 9 * HOUR + 3 * US)]
    for _ in range(40):
        start = T0 + rng.randrange(-2 * HOUR, 28 * HOUR)
        out.append((start, start + rng.choice([HOUR, 2 * HOUR + 7, 5 * HOUR, rng.randrange(1, 20 * HOUR)])))
    return out


def assert_bursts_equal_a_scan(ledger: Ledger, rule: reports.AnomalyRule = RULE, tenant: str = "") -> None:
    for start, end in windows():
        q = query(start, end, group_by=("api_key",), tenant_id=tenant)
        assert reports.anomalous_keys(ledger.tx, q, rule) == reports.anomalous_keys(ledger.tx, q, rule,
                                                                                    rollups=False), (start, end)
        assert reports.build(ledger.tx, q, rule) == reports.build(ledger.tx, q, rule, rollups=False)


@pytest.mark.parametrize("seed", [1, 2])
def test_burst_table_rolled_in_small_steps_equals_one_built_at_once_and_reports_equal_a_scan(seed: int) -> None:
    ledger = bursty_ledger(seed)
    while rollups.roll(ledger.tx, limit=97):  # many rolls, each run split across several of them
        pass
    rolled = burst_rows(ledger)
    assert len({r[0] for r in rolled}) > 10  # bursts in many hours
    assert_bursts_equal_a_scan(ledger)
    assert_bursts_equal_a_scan(ledger, tenant="acme")
    rollups.rebuild(ledger.tx)
    assert burst_rows(ledger) == rolled


def test_late_events_and_events_after_the_mark_make_bursts_in_old_hours() -> None:
    ledger = bursty_ledger(3)
    rollups.roll(ledger.tx)
    old = T0 + 3 * HOUR - 3 * US  # a run across the hour's start, arriving late and in two rolls
    for n in range(60):
        add(ledger, f"late{n}", 1, old + n * 100_000, key="late")
        if n == 30:
            rollups.roll(ledger.tx)
    assert_bursts_equal_a_scan(ledger)  # half of it after the mark
    assert "late" in reports.anomalous_keys(ledger.tx, query(T0 + 2 * HOUR, T0 + 5 * HOUR), RULE)
    rollups.roll(ledger.tx)
    assert_bursts_equal_a_scan(ledger)
    assert ("late" in reports.anomalous_keys(ledger.tx, query(T0 + 3 * HOUR - 3 * US + 1, T0 + 5 * HOUR), RULE)) \
        is True
    # A run that starts in the last whole hour and ends past the window's end counts only in longer windows.
    for n in range(51):
        add(ledger, f"edge{n}", 1, T0 + 8 * HOUR - 2 * US + n * 100_000, key="edge")
    rollups.roll(ledger.tx)
    assert "edge" not in reports.anomalous_keys(ledger.tx, query(T0, T0 + 8 * HOUR + US), RULE)
    assert "edge" in reports.anomalous_keys(ledger.tx, query(T0, T0 + 8 * HOUR + 4 * US), RULE)
    assert_bursts_equal_a_scan(ledger)


def test_a_new_rule_reads_the_events_until_the_next_roll_rebuilds_the_table_for_it() -> None:
    ledger = bursty_ledger(4)
    rollups.roll(ledger.tx)
    strict = reports.AnomalyRule(max_requests=30, window_s=3, hourly_factor_permille=3000)
    assert_bursts_equal_a_scan(ledger, strict)  # the table is for (50, 10): not used
    assert rollups.roll(ledger.tx, rule=(30, 3)) == 0
    assert ledger.tx.one("SELECT max_requests, window_s FROM usage_burst_rule")[0:2] == (30, 3)
    built = burst_rows(ledger)
    rollups.rebuild(ledger.tx)
    assert burst_rows(ledger) == built
    assert_bursts_equal_a_scan(ledger, strict)
    assert_bursts_equal_a_scan(ledger)  # and the old rule now reads the events


def test_a_first_report_reads_no_events_of_old_hours_for_the_burst_rule() -> None:
    ledger = Ledger()
    for hour in range(24):  # a burst in every hour, found by the rolls
        for n in range(51):
            add(ledger, f"b{hour}-{n}", 1, T0 + hour * HOUR + 600 * US + n * 1000, key=f"busy{hour % 3}")
    rollups.roll(ledger.tx)
    seen: list[tuple[int, int]] = []
    original = ledger.tx.all

    def spy(sql: str, params: Any = ()) -> Any:
        if "OVER (PARTITION BY" in sql:
            seen.append((params[0], params[1]))
        return original(sql, params)

    ledger.tx.all = spy  # type: ignore[method-assign]
    q = query(T0 + 1, T0 + 24 * HOUR - 1)
    assert reports.anomalous_keys(ledger.tx, q, RULE) == {"busy0", "busy1", "busy2"}
    # One query per edge at most, over the partial hours and one window into the whole ones (not per hour).
    assert len(seen) <= 2 and all(lo >= T0 + 23 * HOUR - 10 * US or hi <= T0 + HOUR + 10 * US for lo, hi in seen)


def test_a_key_of_two_tenants_bursts_across_them_in_a_report_of_all_tenants() -> None:
    ledger = Ledger()
    for n in range(60):  # 30 requests under each tenant, interleaved: a burst only counted together
        event = UsageEvent(f"s{n}", "acme" if n % 2 else "globex", "shared", "m", end_us=T0 + 3 * HOUR + n * 100_000)
        ledger.ingester.ingest(ledger.tx, [event], T0)
    rollups.roll(ledger.tx)
    assert reports.anomalous_keys(ledger.tx, query(T0, T0 + 10 * HOUR), RULE) == {"shared"}
    assert reports.anomalous_keys(ledger.tx, query(T0, T0 + 10 * HOUR, tenant_id="acme"), RULE) == set()
    assert_bursts_equal_a_scan(ledger)


def day_rows(ledger: Ledger) -> list[tuple[Any, ...]]:
    return [tuple(r) for r in ledger.tx.all("SELECT * FROM usage_days_by_key ORDER BY 1, 2, 3")]


def scanned_days(ledger: Ledger) -> list[tuple[Any, ...]]:
    day = 24 * HOUR
    return [tuple(r) for r in ledger.tx.all(
        f"SELECT end_us / {day} * {day}, tenant_id, api_key_id, COUNT(DISTINCT end_us / {HOUR}), COUNT(*),"
        f" SUM(cost_micros) FROM events GROUP BY 1, 2, 3 ORDER BY 1, 2, 3")]


def test_the_daily_table_counts_each_hour_of_a_key_once_however_its_events_are_rolled() -> None:
    ledger = random_ledger(5, 1500, 30)
    while rollups.roll(ledger.tx, limit=37):  # an hour's events over many rolls, and late events in old hours
        pass
    assert day_rows(ledger) == scanned_days(ledger) and len({r[0] for r in day_rows(ledger)}) >= 10
    for n in range(40):
        add(ledger, f"late{n}", 7, T0 - 5 * 24 * HOUR + n * 7 * HOUR // 3, key=f"k{n % 3}")
    rollups.roll(ledger.tx)
    assert day_rows(ledger) == scanned_days(ledger)
    rolled = day_rows(ledger)
    rollups.rebuild(ledger.tx)
    assert day_rows(ledger) == rolled


def test_the_spend_rule_weighs_an_hour_against_a_week_of_whole_days_of_history() -> None:
    ledger = Ledger()
    for hour in range(1, 7 * 24 + 1, 5):  # 34 hours of history over seven days, 100 micro-units each
        add(ledger, f"a{hour}", 60, T0 - hour * HOUR + 10, key="steady")
        add(ledger, f"b{hour}", 40, T0 - hour * HOUR + 20, key="steady")  # a second event in the same hour
        add(ledger, f"c{hour}", 100, T0 - hour * HOUR + 30, key="spiky")
        rollups.roll(ledger.tx, limit=1)  # each event in its own roll: an hour is counted once
    add(ledger, "old", 10**6, T0 - 8 * 24 * HOUR, key="steady")  # before the week: not in its mean
    add(ledger, "normal", 290, T0 + HOUR + 5, key="steady")  # 2.9x its mean: under the 3x rule
    add(ledger, "spike", 301, T0 + HOUR + 5, key="spiky")
    for rolled in (False, True):
        for start in (T0, T0 + 1800 * US):  # the week before the window's first hour, either way
            q = query(start, T0 + 2 * HOUR, group_by=("api_key",))
            assert reports.anomalous_keys(ledger.tx, q, RULE) == {"spiky"} == \
                reports.anomalous_keys(ledger.tx, q, RULE, rollups=False)
        if not rolled:
            rollups.roll(ledger.tx)


def test_a_burst_step_computed_before_the_table_moved_or_its_rule_changed_is_dropped() -> None:
    from services.billing import bursts

    ledger = bursty_ledger(5)
    rollups.roll(ledger.tx, with_bursts=False)
    end = rollups.mark(ledger.tx)
    stale = bursts.step(ledger.tx, end)
    assert stale is not None and stale.rows
    newer = bursts.step(ledger.tx, end)
    assert newer is not None and bursts.apply(ledger.tx, newer)
    assert not bursts.apply(ledger.tx, stale) and not bursts.apply(ledger.tx, newer)  # the table moved past them
    kept = burst_rows(ledger)
    rollups.rebuild(ledger.tx)
    assert burst_rows(ledger) == kept
    for n in range(60):
        add(ledger, f"more{n}", 1, T0 + 4 * HOUR + n * 50_000, key="k9")
    rollups.roll(ledger.tx, with_bursts=False)
    old_rule = bursts.step(ledger.tx, rollups.mark(ledger.tx))
    assert old_rule is not None
    rollups.roll(ledger.tx, rule=(30, 3), with_bursts=False)  # rebuilt for another rule meanwhile
    assert not bursts.apply(ledger.tx, old_rule)
    strict = reports.AnomalyRule(max_requests=30, window_s=3, hourly_factor_permille=3000)
    assert_bursts_equal_a_scan(ledger, strict)


def test_a_new_rule_rebuilds_the_burst_table_from_a_read_step_and_reports_scan_until_it_is_written() -> None:
    from services.billing import bursts

    ledger = bursty_ledger(6)
    rollups.roll(ledger.tx)
    strict = reports.AnomalyRule(max_requests=30, window_s=3, hourly_factor_permille=3000)
    rollups.roll(ledger.tx, with_bursts=False)  # billing's roll: no rebuild in it
    assert ledger.tx.one("SELECT max_requests, window_s FROM usage_burst_rule")[0:2] == (50, 10)  # type: ignore[index]
    rebuilt = bursts.step(ledger.tx, rollups.mark(ledger.tx), rule=(30, 3))
    assert rebuilt is not None and rebuilt.rebuilt_for == (30, 3)
    assert_bursts_equal_a_scan(ledger, strict)  # not written yet: the events answer
    assert bursts.apply(ledger.tx, rebuilt) and not bursts.apply(ledger.tx, rebuilt)
    assert ledger.tx.one("SELECT max_requests, window_s FROM usage_burst_rule")[0:2] == (30, 3)  # type: ignore[index]
    assert bursts.step(ledger.tx, rollups.mark(ledger.tx), rule=(30, 3)) is None  # nothing more to add
    written = burst_rows(ledger)
    rollups.rebuild(ledger.tx)
    assert burst_rows(ledger) == written and written
    assert_bursts_equal_a_scan(ledger, strict)


def rollup_rows(ledger: Ledger) -> dict[str, list[tuple[Any, ...]]]:
    tables = (rollups.BY_MODEL, rollups.BY_KEY, rollups.BY_TAG, rollups.KEY_GROUPS, rollups.BY_KEY_DAYS)
    return {t: [tuple(r) for r in ledger.tx.all(f"SELECT * FROM {t} ORDER BY 1, 2, 3, 4")] for t in tables}


def test_events_summed_on_a_snapshot_are_folded_in_once_and_a_stale_sum_is_not() -> None:
    ledger = random_ledger(7, 1200, 30)
    grouped = rollups.group(ledger.tx, limit=700)  # as the roller sums them, on a read snapshot
    assert grouped is not None and (grouped.start, grouped.end) == (0, 700) and grouped.rows
    for n in range(30):  # recorded after the snapshot, before the writer folds the sums in
        add(ledger, f"after{n}", 5, T0 + 3 * HOUR + n, key="k3")
    assert rollups.roll(ledger.tx, grouped=grouped) == 700 and rollups.mark(ledger.tx) == 700
    stale = rollups.group(ledger.tx, limit=200)
    assert stale is not None and stale.start == 700
    rollups.roll(ledger.tx, limit=100)  # another roll moved the mark meanwhile: the stale sums are dropped
    assert rollups.roll(ledger.tx, limit=50, grouped=stale) == 50 and rollups.mark(ledger.tx) == 850
    while rollups.roll(ledger.tx, grouped=rollups.group(ledger.tx)):
        pass
    assert rollups.mark(ledger.tx) == 1261 + 30 and rollups.group(ledger.tx) is None
    rolled = rollup_rows(ledger)
    rollups.rebuild(ledger.tx)  # every table again from a scan of the events
    assert rollup_rows(ledger) == rolled and all(rolled.values())



@pytest.mark.parametrize("seed", [5, 6])
def test_burst_steps_served_from_each_keys_kept_tail_equal_the_table_built_at_once(seed: int) -> None:
    """Billing's roller keeps each key's latest end times between steps (`bursts.Tails`), so a step of events
    in order reads no earlier ones. Keys in order, a little late, later than two windows, with shared end
    times, busy (over 2 n events a step) and quiet, one evicted from the tails: the table equals a rebuild."""
    import random

    rng = random.Random(seed)
    ledger = Ledger()
    tails = bursts.Tails(keys=3)
    clock, served, read_back = T0, 0, 0
    for step in range(40):
        clock += rng.choice([0, 0, HOUR // 3])  # bursts in many hours
        for n in range(rng.randint(20, 400)):  # late events and the fourth key in some steps
            clock += rng.choice([0, 1, 5_000, 50_000, 200_000])
            late = rng.choice([0] * 30 + [rng.randrange(0, 5 * US), rng.randrange(0, 40 * US)]) if step % 3 == 2 else 0
            key = f"k{rng.randint(0, 3 if step % 5 == 4 else 2)}"
            for copy in range(rng.choice([1, 1, 1, 3])):  # some end times shared by a key's events
                add(ledger, f"s{step}-{n}-{copy}", 1, clock - late, key=key)
        rollups.roll(ledger.tx, with_bursts=False)
        found = bursts.step(ledger.tx, rollups.mark(ledger.tx), tails=tails)
        assert found is not None and bursts.apply(ledger.tx, found)
        tails.adopt(found)
        served += found.read_back == 0
        read_back += found.read_back
    assert served > 5 and read_back > 5  # some steps wholly from the tails, some keys read back
    assert len(tails) == 3
    kept = burst_rows(ledger)
    assert len({(r[0], r[2]) for r in kept}) > 10
    rollups.rebuild(ledger.tx)
    assert burst_rows(ledger) == kept
    assert_bursts_equal_a_scan(ledger)


def test_a_steps_tails_serve_only_the_step_that_starts_where_they_end() -> None:
    ledger = bursty_ledger(8)
    rollups.roll(ledger.tx, with_bursts=False)
    tails = bursts.Tails()
    first = bursts.step(ledger.tx, rollups.mark(ledger.tx), tails=tails)
    assert first is not None and first.read_back > 0 and bursts.apply(ledger.tx, first)
    tails.adopt(first)
    for n in range(60):
        add(ledger, f"next{n}", 1, T0 + 40 * HOUR + n * 100_000, key="k1")
    rollups.roll(ledger.tx, with_bursts=False)
    end = rollups.mark(ledger.tx)
    served = bursts.step(ledger.tx, end, tails=tails)
    assert served is not None and served.read_back == 0  # k1's new events came after its tail
    rollups.rebuild(ledger.tx)  # the table moved (its seq is the mark's): the tails are of another seq
    add(ledger, "after", 1, T0 + 40 * HOUR + 61 * 100_000, key="k1")
    rollups.roll(ledger.tx, with_bursts=False)
    again = bursts.step(ledger.tx, rollups.mark(ledger.tx), tails=tails)
    assert again is not None and again.read_back == 1
