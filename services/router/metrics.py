"""Router metrics on the process's Prometheus registry (served on `--metrics-port`): requests by outcome,
tokens and spend by tenant, time to first token, latency, cache hits; each replica's reported load and how
often prefix affinity chose the replica."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from services.router.ports import UsageRecord
from services.router.types import Money

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
