"""Least-outstanding-requests balancing across a version's replicas, with health-based ejection.

The load of a replica is the calls this router has in flight to it plus the queue depth and active
sequences its latest `WatchLoad` report showed. A replica failing `eject_after` consecutive health
checks (or reporting not ready) is ejected; one passing check brings it back.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import structlog

from services.common.errors import Unavailable

log = structlog.get_logger(__name__)


@dataclass
class ReplicaState:
    address: str
    outstanding: int = 0
    reported_load: int = 0
    failed_checks: int = 0
    ejected: bool = False

    @property
    def load(self) -> int:
        return self.outstanding + self.reported_load


class Balancer:
    def __init__(self, eject_after: int = 3, rng: random.Random | None = None) -> None:
        self._eject_after = eject_after
        self._rng = rng or random.Random()
        self._replicas: dict[str, ReplicaState] = {}

    def state(self, address: str) -> ReplicaState:
        state = self._replicas.get(address)
        if state is None:
            state = self._replicas[address] = ReplicaState(address)
        return state

    def healthy(self, addresses: tuple[str, ...]) -> list[str]:
        return [a for a in addresses if not self.state(a).ejected]

    def pick(self, addresses: tuple[str, ...], avoid: frozenset[str] = frozenset()) -> str:
        """The least-loaded healthy replica not in `avoid` (falls back to avoided ones if nothing else)."""
        healthy = self.healthy(addresses)
        if not healthy:
            raise Unavailable("no healthy inference replica for this model version; retry shortly")
        candidates = [a for a in healthy if a not in avoid] or healthy
        lowest = min(self.state(a).load for a in candidates)
        return self._rng.choice([a for a in candidates if self.state(a).load == lowest])

    @contextmanager
    def track(self, address: str) -> Iterator[None]:
        state = self.state(address)
        state.outstanding += 1
        try:
            yield
        finally:
            state.outstanding -= 1

    def report_load(self, address: str, queued: int, active: int, ready: bool) -> None:
        state = self.state(address)
        state.reported_load = queued + active
        if not ready:
            self.health_check(address, ok=False)

    def health_check(self, address: str, ok: bool) -> None:
        state = self.state(address)
        if ok:
            if state.ejected:
                log.info("replica_restored", replica=address)
            state.failed_checks = 0
            state.ejected = False
            return
        state.failed_checks += 1
        if state.failed_checks >= self._eject_after and not state.ejected:
            state.ejected = True
            log.warning("replica_ejected", replica=address, failed_checks=state.failed_checks)
