"""Least-outstanding-requests balancing across a version's replicas, with health-based ejection.

The load of a replica is the calls this router has in flight to it plus the queue depth and active
sequences its latest `WatchLoad` report showed. A replica failing `eject_after` consecutive health
checks (or reporting not ready) is ejected; one passing check brings it back.

Prefix affinity (a hint, not a pin): a request with an affinity key (its tenant and conversation, or
the leading block of its prompt) prefers the replica that rendezvous hashing ranks first for that key
among the candidates, so every turn of a conversation, or every request behind one shared system
prompt, meets the prompt blocks that replica's prefix cache holds. The preferred replica is passed
over for the least-loaded one when its load exceeds that one's by more than `affinity_margin`; a
replica that fails or is ejected drops out of the ranking, and the key moves to the next in rank.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import structlog

from services.common.errors import Unavailable
from services.router.metrics import AFFINITY_PICKS, REPLICA_LOAD

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


def rendezvous_rank(key: str, address: str) -> bytes:
    """The weight of `address` for `key` (highest wins): the same on every router, for any replica order."""
    return hashlib.blake2b(f"{key}\x00{address}".encode(), digest_size=8).digest()


class Balancer:
    def __init__(self, eject_after: int = 3, rng: random.Random | None = None, affinity_margin: int | None = 4) -> None:
        """`affinity_margin`: how much more load than the least-loaded candidate the replica an affinity
        key prefers may carry and still be picked (None: affinity off, always the least loaded)."""
        self._eject_after = eject_after
        self._rng = rng or random.Random()
        self._affinity_margin = affinity_margin
        self._replicas: dict[str, ReplicaState] = {}

    def state(self, address: str) -> ReplicaState:
        state = self._replicas.get(address)
        if state is None:
            state = self._replicas[address] = ReplicaState(address)
        return state

    def healthy(self, addresses: tuple[str, ...]) -> list[str]:
        return [a for a in addresses if not self.state(a).ejected]

    def pick(self, addresses: tuple[str, ...], avoid: frozenset[str] = frozenset(), affinity: str = "") -> str:
        """The least-loaded healthy replica not in `avoid` (falls back to avoided ones if nothing else),
        or, given an `affinity` key, the candidate it prefers unless that one is loaded past the margin."""
        healthy = self.healthy(addresses)
        if not healthy:
            raise Unavailable("no healthy inference replica for this model version; retry shortly")
        candidates = [a for a in healthy if a not in avoid] or healthy
        lowest = min(self.state(a).load for a in candidates)
        if affinity and self._affinity_margin is not None and len(candidates) > 1:
            preferred = max(candidates, key=lambda a: rendezvous_rank(affinity, a))
            if self.state(preferred).load <= lowest + self._affinity_margin:
                AFFINITY_PICKS.labels("preferred").inc()
                return preferred
            AFFINITY_PICKS.labels("overridden").inc()
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
        REPLICA_LOAD.labels(address).set(state.reported_load)
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
