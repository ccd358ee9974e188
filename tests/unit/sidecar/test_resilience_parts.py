"""Breaker, retry budget, backoff, outlier ejection and token bucket on a fake clock."""

from __future__ import annotations

from sidecar.breaker import BreakerState, CircuitBreaker
from sidecar.outlier import OutlierDetector
from sidecar.policy import Backoff, BreakerPolicy, OutlierPolicy, RetryBudget
from sidecar.ratelimit import TokenBucket
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
