"""The router's retry budget: a floor per second plus a share of recent requests, over a sliding window."""

from __future__ import annotations

from services.router.retry import RetryBudget, RetrySettings


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def spend_all(budget: RetryBudget) -> int:
    spent = 0
    while budget.try_spend():
        spent += 1
        assert spent < 10_000
    return spent


def test_floor_allows_a_burst_and_requests_add_their_share() -> None:
    clock = FakeClock()
    budget = RetryBudget(RetrySettings(budget_ratio=0.2, budget_floor_per_s=1.0), clock, window_s=10.0)
    assert spend_all(budget) == 10  # the floor: 1/s over the 10 s window
    for _ in range(100):
        budget.on_request()
    assert spend_all(budget) == 20  # 20 % of the 100 requests in the window


def test_budget_recovers_when_the_window_slides() -> None:
    clock = FakeClock()
    budget = RetryBudget(RetrySettings(budget_ratio=0.0, budget_floor_per_s=0.5), clock, window_s=10.0)
    assert spend_all(budget) == 5
    clock.now = 5.0
    assert not budget.try_spend()
    clock.now = 10.5  # the first retries left the window
    assert spend_all(budget) == 5


def test_a_replica_death_with_many_unstarted_streams_can_fail_over() -> None:
    clock = FakeClock()
    budget = RetryBudget(RetrySettings(), clock)
    for _ in range(50):
        budget.on_request()
    assert spend_all(budget) >= 25  # half of 50 streams on the dead replica may all retry
