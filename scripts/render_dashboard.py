"""Write deploy/grafana/autoglm-mesh.json, the Grafana dashboard of the mesh (Prometheus data source).

`python scripts/render_dashboard.py` rewrites it; tests check every metric it queries is exported by a
running mesh.
"""

from __future__ import annotations

import json
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "deploy" / "grafana" / "autoglm-mesh.json"

PANELS: list[tuple[str, str, list[tuple[str, str]]]] = [
    # (title, unit, [(expression, legend)])
    ("Router requests by status", "reqps",
     [("sum by (status) (rate(autoglm_router_requests_total[1m]))", "{{status}}")]),
    ("Time to first token (router)", "s",
     [("histogram_quantile(0.5, sum by (le) (rate(autoglm_router_time_to_first_token_seconds_bucket[5m])))", "p50"),
      ("histogram_quantile(0.99, sum by (le) (rate(autoglm_router_time_to_first_token_seconds_bucket[5m])))", "p99")]),
    ("Tokens per second by tenant", "short",
     [("sum by (tenant, kind) (rate(autoglm_router_tokens_total[1m]))", "{{tenant}} {{kind}}")]),
    ("Spend by tenant (micro-units / hour)", "short",
     [("sum by (tenant, currency) (increase(autoglm_billing_spend_micros_total[1h]))", "{{tenant}} {{currency}}")]),
    ("Budget utilisation (per mille)", "short",
     [("max by (budget_id, tenant) (autoglm_billing_budget_utilization_permille)", "{{tenant}} {{budget_id}}")]),
    ("Budget alert level (0 ok, 1 warning, 2 critical, 3 emergency)", "short",
     [("max by (budget_id, tenant) (autoglm_billing_budget_alert_level)", "{{tenant}} {{budget_id}}")]),
    ("Inference tokens per second", "short",
     [("sum by (replica) (autoglm_inference_tokens_per_second)", "{{replica}}")]),
    ("Inference queue depth and active sequences", "short",
     [("sum by (replica) (autoglm_inference_queue_depth)", "queue {{replica}}"),
      ("sum by (replica) (autoglm_inference_active_sequences)", "active {{replica}}")]),
    ("KV-cache in use", "bytes",
     [("sum by (replica) (autoglm_inference_kv_cache_bytes)", "{{replica}}")]),
    ("Inference time to first token", "s",
     [("histogram_quantile(0.99, sum by (le) (rate(autoglm_inference_time_to_first_token_seconds_bucket[5m])))",
       "p99")]),
    ("Sidecar requests by status", "reqps",
     [("sum by (direction, code) (rate(sidecar_requests_total[1m]))", "{{direction}} {{code}}")]),
    ("Sidecar circuit breakers (0 closed, 1 half-open, 2 open)", "short",
     [("max by (cluster) (sidecar_circuit_breaker_state)", "{{cluster}}")]),
    ("RPC errors by service", "reqps",
     [('sum by (service, code) (rate(autoglm_rpc_handled_total{code!="OK"}[1m]))', "{{service}} {{code}}")]),
]


def dashboard() -> dict[str, object]:
    panels = []
    for index, (title, unit, targets) in enumerate(PANELS):
        panels.append({
            "id": index + 1, "type": "timeseries", "title": title,
            "datasource": {"type": "prometheus", "uid": "${datasource}"},
            "gridPos": {"h": 8, "w": 12, "x": (index % 2) * 12, "y": (index // 2) * 8},
            "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
            "targets": [{"refId": chr(ord("A") + i), "expr": expr, "legendFormat": legend}
                        for i, (expr, legend) in enumerate(targets)],
        })
    return {
        "title": "Open-AutoGLM mesh", "uid": "autoglm-mesh", "schemaVersion": 39, "version": 1,
        "tags": ["autoglm"], "time": {"from": "now-1h", "to": "now"}, "refresh": "10s",
        "templating": {"list": [{"name": "datasource", "type": "datasource", "query": "prometheus"}]},
        "panels": panels,
    }


if __name__ == "__main__":
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(dashboard(), indent=2) + "\n")
    print(OUT)
