"""Outlier ejection per upstream endpoint: an endpoint failing `consecutive_failures` calls in a row is
left out of the pick for base_ejection_s × (times ejected), never more than max_ejection_percent of them."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from sidecar.policy import OutlierPolicy


@dataclass
class EndpointHealth:
    address: str
    consecutive_failures: int = 0
    ejected_until: float = 0.0
    ejections: int = 0
    requests_total: int = 0
    failures_total: int = 0
    active: int = 0


class OutlierDetector:
    def __init__(self, addresses: Sequence[str], policy: OutlierPolicy,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.policy = policy
        self._clock = clock
        self.endpoints = [EndpointHealth(a) for a in addresses]
        self._next = 0

    def ejected(self, endpoint: EndpointHealth) -> bool:
        return endpoint.ejected_until > self._clock()

    def pick(self) -> int:
        """Round robin over endpoints not ejected (all of them if every one is ejected)."""
        count = len(self.endpoints)
        for _ in range(count):
            index = self._next % count
            self._next += 1
            if not self.ejected(self.endpoints[index]):
                return index
        index = self._next % count
        self._next += 1
        return index

    def record(self, index: int, success: bool) -> bool:
        """Record a call's outcome; True when this failure ejected the endpoint."""
        endpoint = self.endpoints[index]
        endpoint.requests_total += 1
        if success:
            endpoint.consecutive_failures = 0
            return False
        endpoint.failures_total += 1
        endpoint.consecutive_failures += 1
        if endpoint.consecutive_failures < self.policy.consecutive_failures or self.ejected(endpoint):
            return False
        ejected_now = sum(1 for e in self.endpoints if self.ejected(e))
        over_limit = (ejected_now + 1) * 100 > self.policy.max_ejection_percent * len(self.endpoints)
        if ejected_now and over_limit:  # like Envoy, one endpoint may always be ejected
            return False
        endpoint.ejections += 1
        endpoint.consecutive_failures = 0
        endpoint.ejected_until = self._clock() + self.policy.base_ejection_s * endpoint.ejections
        return True
