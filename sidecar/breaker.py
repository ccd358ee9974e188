"""A circuit breaker: closed → open (consecutive failures or failure ratio in a window) → half-open
(a few probe calls) → closed on a probe's success, open again on its failure."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from enum import Enum

from sidecar.policy import BreakerPolicy


class BreakerState(Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class CircuitBreaker:
    def __init__(self, policy: BreakerPolicy, clock: Callable[[], float] = time.monotonic,
                 on_change: Callable[[BreakerState], None] | None = None) -> None:
        self.policy = policy
        self._clock = clock
        self._on_change = on_change
        self._state = BreakerState.CLOSED
        self._opened_at = 0.0
        self._consecutive = 0
        self._window: deque[tuple[float, bool]] = deque()
        self._window_failures = 0
        self._probes = 0

    @property
    def state(self) -> BreakerState:
        if self._state is BreakerState.OPEN and self._clock() - self._opened_at >= self.policy.open_s:
            self._set(BreakerState.HALF_OPEN)
            self._probes = 0
        return self._state

    def _set(self, state: BreakerState) -> None:
        if state is not self._state:
            self._state = state
            if self._on_change:
                self._on_change(state)

    def allow(self) -> bool:
        """May a call go out now? In half-open, admits up to `half_open_probes` calls."""
        state = self.state
        if state is BreakerState.CLOSED:
            return True
        if state is BreakerState.HALF_OPEN and self._probes < self.policy.half_open_probes:
            self._probes += 1
            return True
        return False

    def _trim(self, now: float) -> None:
        horizon = now - self.policy.window_s
        while self._window and self._window[0][0] < horizon:
            _, failed = self._window.popleft()
            self._window_failures -= failed

    def record(self, success: bool) -> None:
        now = self._clock()
        if self._state is BreakerState.HALF_OPEN:
            if success:
                self._consecutive = 0
                self._window.clear()
                self._window_failures = 0
                self._set(BreakerState.CLOSED)
            else:
                self._open(now)
            return
        if self._state is BreakerState.OPEN:
            return
        self._window.append((now, not success))
        self._window_failures += not success
        self._trim(now)
        self._consecutive = 0 if success else self._consecutive + 1
        if self._consecutive >= self.policy.consecutive_failures:
            self._open(now)
        elif (len(self._window) >= self.policy.min_requests
              and self._window_failures / len(self._window) >= self.policy.failure_ratio):
            self._open(now)

    def _open(self, now: float) -> None:
        self._opened_at = now
        self._consecutive = 0
        self._window.clear()
        self._window_failures = 0
        self._set(BreakerState.OPEN)
