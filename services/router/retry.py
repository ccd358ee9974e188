"""Retry pacing: exponential backoff with full jitter, and a retry budget shared by all requests.

The budget allows retries up to `ratio` of recent requests plus a small floor per second, so a
failing dependency sees at most a bounded amount of extra traffic instead of a retry storm.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class RetrySettings:
    max_attempts: int = 3
    base_delay_s: float = 0.02
    max_delay_s: float = 0.5
    budget_ratio: float = 0.2
    budget_floor_per_s: float = 5.0


def backoff_delay(attempt: int, settings: RetrySettings, rng: random.Random) -> float:
    """Full jitter: uniform in [0, min(max, base * 2**attempt)]."""
    return rng.uniform(0, min(settings.max_delay_s, settings.base_delay_s * (2**attempt)))


class RetryBudget:
    def __init__(self, settings: RetrySettings, clock: Callable[[], float] = time.monotonic) -> None:
        self._settings = settings
        self._clock = clock
        self._tokens = settings.budget_floor_per_s
        self._stamp = clock()

    def _refill(self) -> None:
        now = self._clock()
        cap = max(self._settings.budget_floor_per_s, 10.0)
        self._tokens = min(cap, self._tokens + (now - self._stamp) * self._settings.budget_floor_per_s)
        self._stamp = now

    def on_request(self) -> None:
        self._refill()
        self._tokens = min(self._tokens + self._settings.budget_ratio, 1e6)

    def try_spend(self) -> bool:
        self._refill()
        if self._tokens >= 1:
            self._tokens -= 1
            return True
        return False
