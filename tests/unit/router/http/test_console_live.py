"""The Live page's series: rates and TTFT quantiles between consecutive samples of the counters."""

from __future__ import annotations

import math

import pytest

from services.router.http.console.live import WINDOW_S, LiveSeries, Sample, quantile

BOUNDS = (0.1, 0.5, 1.0, math.inf)


def sample(at: float, requests: float, errors: float, tokens: float, ttft: tuple[float, ...]) -> Sample:
    return Sample(at, requests, errors, tokens, tuple(zip(BOUNDS, ttft, strict=True)))


def test_quantile_interpolates_within_a_bucket_like_prometheus() -> None:
    buckets = [(0.1, 50.0), (0.5, 90.0), (1.0, 100.0), (math.inf, 100.0)]
    assert quantile(0.5, buckets) == pytest.approx(0.1)
    assert quantile(0.7, buckets) == pytest.approx(0.1 + 0.4 * 0.5)
    assert quantile(0.99, buckets) == pytest.approx(0.5 + 0.5 * 0.9)
    assert quantile(0.5, [(0.1, 0.0), (math.inf, 0.0)]) is None


def test_points_are_differences_between_samples_and_old_ones_fall_out() -> None:
    clock = [0.0]
    reads = iter([sample(0, 10, 1, 100, (5, 10, 10, 10)), sample(5, 20, 3, 600, (5, 15, 20, 20)),
                  sample(5 + WINDOW_S + 10, 20, 3, 600, (5, 15, 20, 20)),
                  sample(10 + WINDOW_S + 10, 20, 3, 600, (5, 15, 20, 20))])
    live = LiveSeries(interval_s=5, clock=lambda: clock[0], read=lambda: next(reads))
    live.take()
    clock[0] = 5
    (point,) = live.points()
    assert point["requests_per_s"] == pytest.approx(2.0) and point["tokens_per_s"] == pytest.approx(100.0)
    assert point["error_rate"] == pytest.approx(0.2)
    # 10 new first tokens: 5 in (0.1, 0.5], 5 in (0.5, 1]: the median is the first bucket's top.
    assert point["ttft_p50_ms"] == pytest.approx(500)
    assert point["ttft_p99_ms"] == pytest.approx(500 + 500 * 0.98)
    clock[0] = 5 + WINDOW_S + 10
    assert live.points() == [], "samples older than the window are gone"
    clock[0] = 10 + WINDOW_S + 10
    (later,) = live.points()
    assert later["requests_per_s"] == 0 and later["ttft_p50_ms"] is None
