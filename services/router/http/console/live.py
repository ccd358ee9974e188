"""The Live page's figures from the router's own Prometheus metrics (services/router/metrics.py): requests/s,
tokens/s (completion), error rate and TTFT p50/p99, per interval between samples, over the last 15 minutes.

A sample of the counters is taken every `interval_s` by the router (and at each read, at most once per
interval); a point is the difference between two consecutive samples."""

from __future__ import annotations

import asyncio
import itertools
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from prometheus_client import Counter, Histogram

from services.router import metrics

WINDOW_S = 15 * 60
OK_STATUSES = frozenset({"COMPLETED", "CANCELLED"})


@dataclass(frozen=True)
class Sample:
    at: float
    requests: float
    errors: float
    completion_tokens: float
    ttft_buckets: tuple[tuple[float, float], ...]  # (upper bound, cumulative count), summed over models


def _values(metric: Counter | Histogram, suffix: str) -> list[tuple[dict[str, str], float]]:
    return [(s.labels, s.value) for family in metric.collect() for s in family.samples if s.name.endswith(suffix)]


def sample(clock: Callable[[], float] = time.time) -> Sample:
    requests = _values(metrics.REQUESTS, "_total")
    buckets: dict[float, float] = {}
    for labels, value in _values(metrics.TTFT, "_bucket"):
        bound = float(labels["le"])
        buckets[bound] = buckets.get(bound, 0.0) + value
    return Sample(
        at=clock(), requests=sum(v for _, v in requests),
        errors=sum(v for labels, v in requests if labels.get("status", "") not in OK_STATUSES),
        completion_tokens=sum(v for labels, v in _values(metrics.TOKENS, "_total") if labels.get("kind") == "completion"),
        ttft_buckets=tuple(sorted(buckets.items())))


def quantile(q: float, buckets: list[tuple[float, float]]) -> float | None:
    """Prometheus' histogram_quantile over cumulative (bound, count) pairs; None without observations."""
    if not buckets or buckets[-1][1] <= 0:
        return None
    total = buckets[-1][1]
    rank = q * total
    lower_bound, lower_count = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if math.isinf(bound):
                return lower_bound
            share = (rank - lower_count) / (count - lower_count) if count > lower_count else 0.0
            return lower_bound + (bound - lower_bound) * share
        lower_bound, lower_count = bound, count
    return lower_bound


class LiveSeries:
    def __init__(self, interval_s: float = 5.0, clock: Callable[[], float] = time.time,
                 read: Callable[[], Sample] | None = None) -> None:
        self.interval_s = interval_s
        self._clock = clock
        self._read = read or (lambda: sample(clock))
        self._samples: deque[Sample] = deque(maxlen=int(WINDOW_S / interval_s) + 2)

    def take(self) -> None:
        now = self._clock()
        if self._samples and now - self._samples[-1].at < min(1.0, self.interval_s):
            return
        self._samples.append(self._read())
        while self._samples and self._samples[0].at < now - WINDOW_S - self.interval_s:
            self._samples.popleft()

    async def run(self) -> None:
        while True:
            self.take()
            await asyncio.sleep(self.interval_s)

    def points(self) -> list[dict[str, float | None]]:
        self.take()
        samples = list(self._samples)
        out: list[dict[str, float | None]] = []
        for before, after in itertools.pairwise(samples):
            span = after.at - before.at
            if span <= 0:
                continue
            requests = after.requests - before.requests
            delta = [(bound, count - dict(before.ttft_buckets).get(bound, 0.0)) for bound, count in after.ttft_buckets]
            p50, p99 = quantile(0.5, delta), quantile(0.99, delta)
            out.append({
                "time": after.at, "requests_per_s": requests / span,
                "tokens_per_s": (after.completion_tokens - before.completion_tokens) / span,
                "error_rate": (after.errors - before.errors) / requests if requests > 0 else 0.0,
                "ttft_p50_ms": None if p50 is None else p50 * 1000,
                "ttft_p99_ms": None if p99 is None else p99 * 1000,
            })
        return out
