"""Retry decisions: exponential backoff with full jitter, and a retry budget shared by a cluster."""

from __future__ import annotations

import random
import time
from collections.abc import Callable

from sidecar.policy import Backoff, RetryBudget


def backoff_delay(attempt: int, backoff: Backoff, rand: Callable[[], float] = random.random) -> float:
    """Full jitter: uniform in [0, min(max, base × 2^(attempt-1))] for the retry after attempt `attempt`."""
    ceiling = min(backoff.max_s, backoff.base_s * (2 ** max(0, attempt - 1)))
    return rand() * ceiling


class RetryBudgetState:
    """Counts requests and retries in flight for one cluster and decides whether one more retry fits.

    A retry may start while retries in flight < ratio × requests in flight, or while fewer than
    `min_per_s` retries have started in the current second (the floor that keeps a quiet service able
    to retry). Every request must call `request_started`/`request_finished`; every retry that
    `try_acquire` admits must call `release`.
    """

    def __init__(self, budget: RetryBudget, clock: Callable[[], float] = time.monotonic) -> None:
        self.budget = budget
        self._clock = clock
        self.active_requests = 0
        self.active_retries = 0
        self.max_active_retries = 0
        self.retries_total = 0
        self.denied_total = 0
        self._second = -1
        self._in_second = 0

    def request_started(self) -> None:
        self.active_requests += 1

    def request_finished(self) -> None:
        self.active_requests -= 1

    def try_acquire(self) -> bool:
        second = int(self._clock())
        if second != self._second:
            self._second, self._in_second = second, 0
        within_ratio = self.active_retries < self.budget.ratio * self.active_requests
        if not within_ratio and self._in_second >= self.budget.min_per_s:
            self.denied_total += 1
            return False
        self._in_second += 1
        self.active_retries += 1
        self.retries_total += 1
        self.max_active_retries = max(self.max_active_retries, self.active_retries)
        return True

    def release(self) -> None:
        self.active_retries -= 1
