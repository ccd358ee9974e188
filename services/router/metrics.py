"""Router metrics on the process's Prometheus registry (served on `--metrics-port`): requests by outcome,
tokens and spend by tenant, time to first token, latency, cache hits; with billing leases, how requests
were admitted (`autoglm_router_budget_admissions_total{path}`: lease, reserve, offline, refused_lease),
each lease's granted and consumed room per budget (`autoglm_router_lease_granted` /
`autoglm_router_lease_consumed{budget_id}`, in the budget's unit) and the usage stream's unacked events and
messages sent (`autoglm_router_usage_unacked`, `autoglm_router_usage_stream_messages_total`); those are
read from the lease book and the stream when scraped, so the request path pays nothing for them; each
replica's reported load and how often prefix affinity chose the replica."""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import REGISTRY, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from services.router.ports import UsageRecord
from services.router.types import Money

if TYPE_CHECKING:
    from services.router.leasebook import LeaseBook
    from services.router.usage_stream import UsageStream

REQUESTS = Counter("autoglm_router_requests_total", "Requests finished, by model, version and status",
                   ["model", "version", "status", "traffic_class"])
TOKENS = Counter("autoglm_router_tokens_total", "Tokens served, by tenant and kind (prompt / completion)",
                 ["tenant", "kind"])
SPEND = Counter("autoglm_router_spend_micros_total", "Spend in micro-units of the currency, by tenant",
                ["tenant", "currency"])
CACHE_HITS = Counter("autoglm_router_cache_hits_total", "Requests answered from the response cache", ["model"])
TTFT = Histogram("autoglm_router_time_to_first_token_seconds", "Time from request to first token", ["model"],
                 buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
LATENCY = Histogram("autoglm_router_request_duration_seconds", "Time from request to last token", ["model"],
                    buckets=(0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120))

REPLICA_LOAD = Gauge("autoglm_router_replica_load", "Queued + active sequences a replica last reported (WatchLoad)",
                     ["replica"])
AFFINITY_PICKS = Counter("autoglm_router_affinity_picks_total",
                         "Replica choices for a request with an affinity key: the preferred replica, or the "
                         "least-loaded one because the preferred one was loaded past the margin", ["outcome"])


def observe(record: UsageRecord, cost: Money, ttft_ms: int, latency_ms: int) -> None:
    REQUESTS.labels(record.model, record.model_version, record.status.name, record.traffic_class.name).inc()
    TOKENS.labels(record.tenant_id, "prompt").inc(record.prompt_tokens)
    TOKENS.labels(record.tenant_id, "completion").inc(record.completion_tokens)
    if cost.micros:
        SPEND.labels(record.tenant_id, cost.currency_code or "").inc(cost.micros)
    if record.cached:
        CACHE_HITS.labels(record.model).inc()
    if record.completion_tokens:
        TTFT.labels(record.model).observe(ttft_ms / 1000)
    LATENCY.labels(record.model).observe(latency_ms / 1000)


ADMISSIONS = Counter("autoglm_router_budget_admissions", "Requests admitted or refused on budget, by path: lease "
                     "(in-process, no billing call), reserve (a billing hold), offline (billing down, an offline "
                     "hold), refused_lease (billing down and a hard budget's lease could not cover it), refused_busy (the "
                     "deadline came while the request waited its turn for a Reserve)", ["path"])


class _LeaseCollector(Collector):
    """Reads the live lease books and usage streams of this process at scrape time."""

    def __init__(self) -> None:
        # By id: a lease book is a dataclass (not hashable); entries go when their object does.
        self.books: weakref.WeakValueDictionary[int, LeaseBook] = weakref.WeakValueDictionary()
        self.streams: weakref.WeakValueDictionary[int, UsageStream] = weakref.WeakValueDictionary()

    def collect(self) -> Iterator[Metric]:
        granted = GaugeMetricFamily("autoglm_router_lease_granted", "Room billing granted this router's lease on "
                                    "the budget (cumulative), in the budget's unit", labels=["budget_id"])
        consumed = GaugeMetricFamily("autoglm_router_lease_consumed", "What this router consumed of that room: "
                                     "requests in flight at their worst case plus the cost of those ended",
                                     labels=["budget_id"])
        for book in list(self.books.values()):
            for budget_id, (g, c) in book.leased().items():
                granted.add_metric([budget_id], g)
                consumed.add_metric([budget_id], c)
        unacked = GaugeMetricFamily("autoglm_router_usage_unacked", "Usage events sent to billing, not acked yet")
        messages = CounterMetricFamily("autoglm_router_usage_stream_messages", "Batches of usage events sent over "
                                       "StreamUsage")
        streams = list(self.streams.values())
        unacked.add_metric([], sum(len(s) for s in streams))
        messages.add_metric([], sum(s.messages for s in streams))
        yield from (granted, consumed, unacked, messages)


_LEASES = _LeaseCollector()
REGISTRY.register(_LEASES)


def watch_leases(book: LeaseBook | None, stream: UsageStream | None) -> None:
    """Export this lease book's and usage stream's state (kept while they live)."""
    if book is not None:
        _LEASES.books[id(book)] = book
    if stream is not None:
        _LEASES.streams[id(stream)] = stream
