"""The engine's Prometheus metrics, in the default registry that `--metrics-port` serves.

Histograms (time to first token, decode batch size) are observed by the decode thread as it steps;
the live figures (queue depth, active sequences, KV-cache, prefix cache, tokens/s, totals) are read from every
running engine's load report at scrape time, labelled by replica id.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator

from prometheus_client import REGISTRY, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from services.inference.engine.types import LoadReport

TTFT = Histogram(
    "autoglm_inference_time_to_first_token_seconds",
    "Seconds from admission to the first generated token (queueing + prefill)", ["replica"],
    buckets=(0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1, 2.5, 5, 10, 30))
BATCH_SIZE = Histogram(
    "autoglm_inference_decode_batch_size", "Sequences decoded together in one model call", ["replica"],
    buckets=(1, 2, 4, 8, 12, 16, 24, 32, 48, 64))

# (name, help, field of LoadReport)
_GAUGES = (
    ("autoglm_inference_tokens_per_second", "Generated tokens per second over the last 2 s", "tokens_per_second"),
    ("autoglm_inference_queue_depth", "Requests waiting for admission", "queue_depth"),
    ("autoglm_inference_queue_capacity", "Admission queue capacity", "queue_capacity"),
    ("autoglm_inference_active_sequences", "Sequences in the running batch (prefill or decode)",
     "active_sequences"),
    ("autoglm_inference_kv_cache_tokens", "Tokens held in the KV-cache", "kv_cache_tokens"),
    ("autoglm_inference_kv_cache_bytes", "Bytes of KV-cache in use", "kv_cache_bytes"),
    ("autoglm_inference_prefix_cache_blocks", "Prompt blocks held by the prefix cache", "prefix_cache_blocks"),
    ("autoglm_inference_prefix_cache_bytes", "Bytes held by the prefix cache", "prefix_cache_bytes"),
)
_COUNTERS = (
    ("autoglm_inference_tokens_generated", "Tokens generated", "generated_total"),
    ("autoglm_inference_cancelled", "Sequences cancelled (client cancel or deadline)", "cancelled_total"),
    ("autoglm_inference_steps_after_cancel", "Model steps cancelled sequences ran after their cancel arrived "
     "(the step under way when it arrived: at most one each)", "steps_after_cancel_total"),
    ("autoglm_inference_prefill_tokens", "Prompt tokens computed (not served from the prefix cache)",
     "prefill_tokens_total"),
    ("autoglm_inference_prefix_cache_hits", "Prompt blocks served from the prefix cache", "prefix_cache_hits"),
    ("autoglm_inference_prefix_cache_misses", "Cacheable prompt blocks prefilled", "prefix_cache_misses"),
    ("autoglm_inference_prefix_cache_warm_tokens", "Finished chat answers' tokens prefilled into the prefix "
     "cache while the replica was idle or, while few sequences ran, as they were decoded",
     "prefix_cache_warm_tokens"),
    ("autoglm_inference_prefix_cache_eager_warm_tokens", "Chat answers' tokens prefilled into the prefix cache "
     "(into a second KV slot) while they were being decoded", "prefix_cache_eager_warm_tokens"),
    ("autoglm_inference_slots_taken_over", "Chat turns that took over their conversation's parked KV slot "
     "(its history's prefill KV already there, nothing copied in)", "slots_taken_over_total"),
    ("autoglm_inference_slots_widened", "Parked KV slots moved, while the replica was idle, to a batch wide "
     "enough for their conversation's next turn", "slots_widened_total"),
)

Report = Callable[[], LoadReport]


class _LiveEngines(Collector):
    """Reads each running engine's load report when /metrics is scraped."""

    def __init__(self) -> None:
        self._reports: dict[int, Report] = {}
        self._lock = threading.Lock()

    def add(self, report: Report) -> int:
        with self._lock:
            key = id(report)
            self._reports[key] = report
            return key

    def remove(self, key: int) -> None:
        with self._lock:
            self._reports.pop(key, None)

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            reports = [report() for report in self._reports.values()]
        by_replica: dict[str, list[LoadReport]] = {}
        for report in reports:
            by_replica.setdefault(report.replica_id, []).append(report)
        for name, text, attr in _GAUGES:
            gauge = GaugeMetricFamily(name, text, labels=["replica"])
            for replica, items in by_replica.items():
                gauge.add_metric([replica], float(sum(getattr(r, attr) for r in items)))
            yield gauge
        for name, text, attr in _COUNTERS:
            counter = CounterMetricFamily(name, text, labels=["replica"])
            for replica, items in by_replica.items():
                counter.add_metric([replica], float(sum(getattr(r, attr) for r in items)))
            yield counter


LIVE = _LiveEngines()
REGISTRY.register(LIVE)


class EngineMetrics:
    """One engine's handle: observes the histograms and lists the engine while it runs."""

    def __init__(self, replica_id: str, report: Report) -> None:
        self._ttft = TTFT.labels(replica_id)
        self._batch = BATCH_SIZE.labels(replica_id)
        self._report = report
        self._key: int | None = None

    def start(self) -> None:
        if self._key is None:
            self._key = LIVE.add(self._report)

    def stop(self) -> None:
        if self._key is not None:
            LIVE.remove(self._key)
            self._key = None

    def first_token(self, seconds: float) -> None:
        self._ttft.observe(seconds)

    def decode_step(self, rows: int) -> None:
        self._batch.observe(rows)
