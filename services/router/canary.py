"""Automatic canary rollback: a non-stable version with traffic that breaks its error-ratio or p99
latency limit over its window (once it has `min_requests` outcomes there) is rolled back: its traffic
goes to the stable version and it goes back to PENDING_APPROVAL, with an audit event naming the numbers.

Each router watches the outcomes it sees; the rollback itself is decided in the shared store
(`Registry.arollback_canary`, under the model's lock, on a worker thread: the request that found the
canary failing waits for the verdict, the event loop does not), so when several routers find the same
canary failing, one rolls it back and writes the one audit event, and the others find it done."""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable

import structlog

from services.router.lifecycle import VersionState
from services.router.registry import Registry

log = structlog.get_logger(__name__)


class CanaryMonitor:
    def __init__(self, registry: Registry, clock: Callable[[], float] = time.monotonic) -> None:
        self._registry = registry
        self._clock = clock
        self._outcomes: dict[tuple[str, str], deque[tuple[float, bool, float]]] = {}

    async def record(self, model: str, version: str, ok: bool, latency_s: float) -> bool:
        """Record one outcome; True when it triggered a rollback."""
        if model not in self._registry:
            return False
        entry = self._registry.get(model)
        try:
            current = entry.version(version)
        except Exception:
            return False
        if current.stable or current.weight_permille == 0 or current.state is not VersionState.ACTIVE:
            return False
        now = self._clock()
        window = self._outcomes.setdefault((model, version), deque())
        window.append((now, ok, latency_s))
        while window and window[0][0] < now - current.canary.window_s:
            window.popleft()
        if len(window) < current.canary.min_requests:
            return False
        errors = sum(1 for _, good, _ in window if not good)
        error_permille = errors * 1000 // len(window)
        latencies = sorted(lat for _, _, lat in window)
        p99 = latencies[min(len(latencies) - 1, math.ceil(0.99 * len(latencies)) - 1)]
        breaches = []
        if error_permille > current.canary.max_error_permille:
            breaches.append(f"error ratio {error_permille / 10:.1f}% > {current.canary.max_error_permille / 10:.1f}%")
        if p99 > current.canary.max_p99_s:
            breaches.append(f"p99 latency {p99:.3f} s > {current.canary.max_p99_s:.3f} s")
        if not breaches:
            return False
        reason = f"canary {version} over {len(window)} requests: " + "; ".join(breaches)
        window.clear()
        if not await self._registry.arollback_canary(model, version, reason, actor="router.canary"):
            return False  # another router rolled it back first
        log.warning("canary_rolled_back", model=model, version=version, reason=reason)
        return True
