"""Retry pacing: exponential backoff with full jitter, and a retry budget shared by all requests.

The budget allows retries up to `ratio` of recent requests plus a small floor per second, so a
failing dependency sees at most a bounded amount of extra traffic instead of a retry storm.
"""

from __future__ import annotations

import random
import time
from collections import deque
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
    """Retries allowed within a sliding window: `budget_floor_per_s` × window plus `budget_ratio` × the
    requests seen in the window (Finagle-style). A burst of failures (a replica dying with many streams
    that had no token yet) can fail over, while a dependency that keeps failing gets at most
    `ratio` extra traffic once the floor is spent."""

    def __init__(self, settings: RetrySettings, clock: Callable[[], float] = time.monotonic,
                 window_s: float = 10.0) -> None:
        self._settings = settings
        self._clock = clock
        self._window_s = window_s
        self._requests: deque[float] = deque()
        self._retries: deque[float] = deque()

    def _trim(self, now: float) -> None:
        horizon = now - self._window_s
        for stamps in (self._requests, self._retries):
            while stamps and stamps[0] < horizon:
                stamps.popleft()

    def on_request(self) -> None:
        now = self._clock()
        self._trim(now)
        self._requests.append(now)

    def try_spend(self) -> bool:
        now = self._clock()
        self._trim(now)
        allowed = self._settings.budget_floor_per_s * self._window_s + self._settings.budget_ratio * len(self._requests)
        if len(self._retries) < allowed:
            self._retries.append(now)
            return True
        return False
