"""Breaker, retry budget, backoff, outlier ejection and token bucket on a fake clock."""

from __future__ import annotations

from sidecar.breaker import BreakerState, CircuitBreaker
from sidecar.outlier import OutlierDetector
from sidecar.policy import Backoff, BreakerPolicy, OutlierPolicy, RetryBudget
from sidecar.ratelimit import CallerBuckets, TokenBucket, address_of, bearer_token, caller_key
from sidecar.retry import RetryBudgetState, backoff_delay


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_breaker_opens_after_consecutive_failures_and_a_probe_closes_it() -> None:
    clock = Clock()
    breaker = CircuitBreaker(BreakerPolicy(consecutive_failures=3, open_s=5, half_open_probes=1), clock=clock)
    for _ in range(3):
        assert breaker.allow()
        breaker.record(False)
    assert breaker.state is BreakerState.OPEN and not breaker.allow()
    clock.now += 5
    assert breaker.state is BreakerState.HALF_OPEN
    assert breaker.allow() and not breaker.allow()  # one probe only
    breaker.record(True)
    assert breaker.state is BreakerState.CLOSED


def test_breaker_reopens_when_the_probe_fails_and_opens_on_failure_ratio() -> None:
    clock = Clock()
    breaker = CircuitBreaker(BreakerPolicy(consecutive_failures=100, failure_ratio=0.5, min_requests=4,
                                           window_s=10, open_s=1), clock=clock)
    for success in (True, False, True, False):
        breaker.record(success)
    assert breaker.state is BreakerState.OPEN
    clock.now += 1
    assert breaker.allow()
    breaker.record(False)
    assert breaker.state is BreakerState.OPEN


def test_retry_budget_is_a_ratio_of_live_requests_with_a_floor_per_second() -> None:
    clock = Clock()
    budget = RetryBudgetState(RetryBudget(ratio=0.5, min_per_s=3), clock=clock)
    for _ in range(4):
        budget.request_started()
    assert budget.try_acquire() and budget.try_acquire()  # 2 = 0.5 × 4
    assert budget.try_acquire()  # the floor: up to 3 retries started this second
    assert not budget.try_acquire()
    clock.now += 1
    assert budget.try_acquire()  # a new second, a new floor
    assert budget.denied_total == 1 and budget.max_active_retries == 4


def test_backoff_is_full_jitter_under_an_exponential_cap() -> None:
    backoff = Backoff(base_s=0.01, max_s=0.05)
    assert backoff_delay(1, backoff, rand=lambda: 1.0) == 0.01
    assert backoff_delay(3, backoff, rand=lambda: 1.0) == 0.04
    assert backoff_delay(10, backoff, rand=lambda: 1.0) == 0.05
    assert backoff_delay(10, backoff, rand=lambda: 0.0) == 0.0


def test_outlier_ejects_a_failing_endpoint_for_a_while_within_the_percent() -> None:
    clock = Clock()
    detector = OutlierDetector(["a", "b", "c", "d"], OutlierPolicy(consecutive_failures=2, base_ejection_s=10,
                                                                    max_ejection_percent=25), clock=clock)
    assert not detector.record(0, False)
    assert detector.record(0, False)
    assert 0 not in {detector.pick() for _ in range(8)}
    detector.record(1, False)
    assert not detector.record(1, False)  # a second ejection would pass 25 %
    clock.now += 10
    assert 0 in {detector.pick() for _ in range(8)}


def test_token_bucket_allows_a_burst_then_the_rate() -> None:
    clock = Clock()
    bucket = TokenBucket(rate=2, burst=3, clock=clock)
    assert [bucket.try_take() for _ in range(4)] == [True, True, True, False]
    clock.now += 0.5
    assert bucket.try_take() and not bucket.try_take()


def test_caller_buckets_are_separate_and_the_table_is_bounded() -> None:
    now = [0.0]
    buckets = CallerBuckets(rate=1.0, burst=2, max_callers=3, clock=lambda: now[0])
    assert [buckets.try_take("a") for _ in range(3)] == [True, True, False]
    assert buckets.try_take("b")  # a's flood leaves b alone
    for caller in ("c", "d", "e"):
        buckets.try_take(caller)
    assert len(buckets) == 3  # least recently used (a, b) dropped
    now[0] = 1.0
    assert buckets.try_take("a")


def test_callers_are_keyed_by_token_hash_identity_or_address_without_port() -> None:
    assert bearer_token("Bearer ag_abc_def") == "ag_abc_def"
    assert bearer_token("bearer  eyJ.a-b_c.d ") == "eyJ.a-b_c.d"
    assert [bearer_token(v) for v in ("", "Bearer", "Basic x", "Bearer a b", "Bearer a%b", "Bearer " + "a" * 5000)] \
        == [None] * 6
    key = caller_key("ag_abc_def", "", "ipv4:1.2.3.4:5")
    assert key.startswith("bearer:") and "ag_abc" not in key  # the token itself is never kept
    assert caller_key(None, "spiffe://td/ns/n/sa/router", "ipv4:1.2.3.4:5") == "id:spiffe://td/ns/n/sa/router"
    assert caller_key(None, "", "ipv4:10.0.0.7:5123") == caller_key(None, "", "ipv4:10.0.0.7:6000") == "addr:ipv4:10.0.0.7"
    assert address_of("ipv6:[::1]:443") == "ipv6:[::1]"
