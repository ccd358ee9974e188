"""What the pages show, from the admin operations' and billing's answers: plain dicts for the templates
and the JSON endpoints. Never a secret: keys are shown by id and prefix only."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from services.common.audit_timeline import TimelineEvent, details_of
from services.router.auth.api_keys import ApiKeyRecord
from services.router.balancer import Balancer
from services.router.ports import LoadReport
from services.router.registry import AuditEvent, ModelEntry

LEVELS = {"ALERT_LEVEL_UNSPECIFIED": "OK", "ALERT_LEVEL_WARNING": "WARNING", "ALERT_LEVEL_CRITICAL": "CRITICAL",
          "ALERT_LEVEL_EMERGENCY": "EMERGENCY"}
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def money(micros: Any) -> str:
    return f"{Decimal(int(micros or 0)) / 1_000_000:.6f}"


def when(value: datetime | str | None) -> str:
    if value is None or value == "":
        return ""
    if isinstance(value, str):
        value = datetime.fromisoformat(value.replace("Z", "+00:00"))
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")


def micros(value: datetime) -> int:
    """Microseconds since the epoch, exactly (a time without a zone is UTC)."""
    aware = value if value.tzinfo else value.replace(tzinfo=UTC)
    return (aware - EPOCH) // timedelta(microseconds=1)


def key(record: ApiKeyRecord) -> dict[str, Any]:
    return {"key_id": record.key_id, "prefix": record.prefix, "tenant_id": record.tenant_id, "name": record.name,
            "models": ", ".join(record.allowed_models) or "all", "rpm": record.requests_per_minute or "none",
            "tpm": record.tokens_per_minute or "none", "traffic_class": record.traffic_class.name.lower(),
            "created": when(record.create_time), "revoked": when(record.revoke_time),
            "expires": when(record.expire_time)}


def budget(status: dict[str, Any]) -> dict[str, Any]:
    b = status["budget"]
    scope = b.get("scope", {})
    kind = scope.get("kind", "")
    target = {"SCOPE_KIND_TENANT": f"tenant {scope.get('tenant_id', '')}",
              "SCOPE_KIND_API_KEY": f"key {scope.get('api_key_id', '')}",
              "SCOPE_KIND_TAG": f"tag {scope.get('tag_key', '')}={scope.get('tag_value', '')}"}.get(kind, "?")
    tokens = int(status.get("effective_tokens") or 0) > 0

    def amount(name: str) -> str:
        return str(int(status.get(f"{name}_tokens") or 0)) if tokens else money(
            (status.get(f"{name}_amount") or {}).get("micros"))

    period = b.get("period", {})
    period_name = str(period.get("kind", "")).removeprefix("PERIOD_KIND_").lower()
    if period_name == "rolling_days":
        period_name = f"rolling{period.get('rolling_days', 0)}d"
    return {"budget_id": b.get("budget_id", ""), "scope": target, "tenant": scope.get("tenant_id", ""),
            "key": scope.get("api_key_id", ""),
            "tag": f"{scope.get('tag_key')}={scope.get('tag_value', '')}" if scope.get("tag_key") else "",
            "period": period_name, "unit": "tokens" if tokens else (b.get("amount") or {}).get("currency_code", "USD"),
            "spent": amount("spent"), "held": amount("held"), "leased": amount("leased"), "limit": amount("effective"),
            "amount": money((b.get("amount") or {}).get("micros")) if not tokens else "",
            "tokens": str(int(b.get("tokens") or 0)) if tokens else "",
            "used": f"{int(status.get('utilization_permille') or 0) / 10:.1f}%",
            "level": LEVELS.get(str(status.get("level", "")), str(status.get("level", ""))),
            "enforcement": str(b.get("enforcement", "")).removeprefix("ENFORCEMENT_").lower(),
            "period_start": when(status.get("period_start")), "webhook": b.get("webhook_url", ""),
            "fired": [{"level": LEVELS.get(str(f.get("level", "")), str(f.get("level", ""))),
                       "time": when(f.get("fire_time")), "used": f"{int(f.get('utilization_permille') or 0) / 10:.1f}%"}
                      for f in status.get("fired", [])]}


def replica_load(found: tuple[LoadReport, float] | None) -> dict[str, Any]:
    """A replica's latest WatchLoad report as the Models page shows it (empty before the first)."""
    if found is None:
        return {"reported": False}
    report, age_s = found
    return {"reported": True, "ready": report.ready, "queue_depth": report.queue_depth,
            "queue_capacity": report.queue_capacity, "active_sequences": report.active_sequences,
            "kv_cache_bytes": report.kv_cache_bytes, "kv_budget_bytes": report.kv_budget_bytes,
            "kv_used": f"{report.kv_cache_bytes / 2**20:.1f} / {report.kv_budget_bytes / 2**20:.0f} MiB",
            "tokens_per_second": round(report.tokens_per_second, 1), "age_s": round(age_s, 1)}


def model(entry: ModelEntry, balancer: Balancer, healthy: dict[str, int],
          rollbacks: list[AuditEvent],
          load: Callable[[str], tuple[LoadReport, float] | None] = lambda _: None) -> dict[str, Any]:
    versions = []
    for v in entry.versions:
        replicas = []
        for address in v.replicas:
            state = balancer.state(address)
            replicas.append({"address": address, "healthy": not state.ejected, "in_flight": state.outstanding,
                             "reported_load": state.reported_load, "failed_checks": state.failed_checks,
                             "load": replica_load(load(address))})
        role = "stable" if v.stable else ("canary" if v.weight_permille else "idle")
        versions.append({"version": v.version, "weight_permille": v.weight_permille, "role": role,
                         "healthy": healthy.get(v.version, 0), "replicas": replicas,
                         "canary": {"max_error_permille": v.canary.max_error_permille, "max_p99_s": v.canary.max_p99_s,
                                    "window_s": v.canary.window_s, "min_requests": v.canary.min_requests}})
    return {"name": entry.name, "context_window": entry.context_window, "fallbacks": ", ".join(entry.fallback_models),
            "versions": versions,
            "rollbacks": [{"time": when(e.time), "actor": e.actor, "reason": str(e.details.get("reason", "")),
                           "to": str(e.details.get("to", ""))} for e in rollbacks if e.target == f"model/{entry.name}"]}


def router_event(event: AuditEvent) -> TimelineEvent:
    """A router audit event (AdminService's ListAuditEvents) on the merged timeline."""
    return TimelineEvent(micros(event.time), "router", event.sequence, event.actor,
                         event.action, event.target, event.details)


def billing_event(event: dict[str, Any]) -> TimelineEvent:
    """A billing audit event (billing's ListAuditEvents, as JSON) on the merged timeline."""
    stamp = datetime.fromisoformat(str(event.get("time") or "1970-01-01T00:00:00Z").replace("Z", "+00:00"))
    return TimelineEvent(micros(stamp), "billing", int(event.get("audit_id") or 0),
                         str(event.get("actor", "")), str(event.get("action", "")), str(event.get("target", "")),
                         details_of(str(event.get("details_json") or "")))


def audit(event: TimelineEvent) -> dict[str, Any]:
    """A row of the Audit page (and of /console/api/audit)."""
    return {"time": when(EPOCH + timedelta(microseconds=event.time_us)), "time_us": event.time_us,
            "source": event.source, "sequence": event.sequence, "actor": event.actor, "action": event.action,
            "target": event.target, "details": event.details}


def _add(out: dict[str, Any], row: dict[str, Any]) -> None:
    out["requests"] += int(row.get("requests") or 0)
    out["prompt_tokens"] += int(row.get("prompt_tokens") or 0)
    out["completion_tokens"] += int(row.get("completion_tokens") or 0)
    out["cost_micros"] += int((row.get("cost") or {}).get("micros") or 0)
    out["anomalous"] = out["anomalous"] or bool(row.get("anomalous"))


def _empty(bucket: str, group: str) -> dict[str, Any]:
    return {"bucket": bucket, "group": group, "requests": 0, "prompt_tokens": 0, "completion_tokens": 0,
            "cost_micros": 0, "anomalous": False}


def spend(report: dict[str, Any], dimension: str, top: int = 10) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """From a report grouped by `dimension` (and maybe api_key) per bucket: the rows per bucket and
    `dimension`, and the `top` keys by cost over the whole window."""
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    keys: dict[str, dict[str, Any]] = {}
    for row in report.get("rows", []):
        group = row.get("group", {})
        bucket = when(row.get("bucket_start")) if row.get("bucket_start") else ""
        value, key = group.get(dimension, "") or "(none)", group.get("api_key", "") or "(none)"
        _add(rows.setdefault((bucket, value), _empty(bucket, value)), row)
        _add(keys.setdefault(key, _empty("", key)), row)
    ordered = sorted(rows.values(), key=lambda r: (r["bucket"], r["group"]))
    top_keys = sorted(keys.values(), key=lambda r: (-r["cost_micros"], r["group"]))[:top]
    for out in (*ordered, *top_keys):
        out["cost"] = money(out.pop("cost_micros"))
    return ordered, top_keys


def last_use(report: dict[str, Any]) -> dict[str, str]:
    """Key id → the latest bucket (hour) it has usage in, from a report grouped by api_key per hour."""
    latest: dict[str, str] = {}
    for row in report.get("rows", []):
        key, bucket = row.get("group", {}).get("api_key", ""), when(row.get("bucket_start"))
        if key and bucket > latest.get(key, ""):
            latest[key] = bucket
    return latest
