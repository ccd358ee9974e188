"""Protobuf messages ↔ the router's plain dataclasses (no logic beyond the mapping)."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime
from enum import IntEnum
from typing import TypeVar

from google.protobuf.duration_pb2 import Duration
from google.protobuf.struct_pb2 import Struct
from google.protobuf.timestamp_pb2 import Timestamp

from autoglm.common.v1 import generation_pb2, money_pb2
from autoglm.router.v1 import admin_service_pb2 as admin_pb2
from autoglm.router.v1 import model_lifecycle_pb2
from autoglm.router.v1 import router_service_pb2 as pb2
from services.common.errors import InvalidInput
from services.common.generation import TrafficClass
from services.common.usage import Usage
from services.router.auth.api_keys import ApiKeyRecord, NewApiKey
from services.router.inference_client import sampling_to_proto
from services.router.jobs.model import ItemResult, ItemSpec, Job, NewJob
from services.router.lifecycle import StateChange, VersionState
from services.router.policy import Policy
from services.router.registry import AuditEvent, CanaryPolicy, ModelEntry
from services.router.types import (
    CachePolicy,
    GenerationRequest,
    Message,
    Money,
    Role,
    Sampling,
    Summary,
)

E = TypeVar("E", bound=IntEnum)


def enum_value(kind: type[E], value: int, field: str) -> E:
    """`kind(value)`, or INVALID_ARGUMENT naming the field and the accepted values (a client built from
    a newer proto, or a fuzzer, may send numbers this build does not know)."""
    try:
        return kind(value)
    except ValueError:
        accepted = ", ".join(f"{m.value} ({m.name})" for m in kind)
        raise InvalidInput(f"{field}: {value} is not a known value; accepted: {accepted}", field=field) from None


def parse_tags(header: str) -> dict[str, str]:
    """`x-autoglm-tags: team=search,env=prod` → {"team": "search", "env": "prod"}."""
    tags: dict[str, str] = {}
    for part in header.split(","):
        if not part.strip():
            continue
        key, sep, value = part.partition("=")
        if not sep or not key.strip():
            raise InvalidInput("x-autoglm-tags must look like 'key=value,key2=value2'", field="x-autoglm-tags")
        tags[key.strip()] = value.strip()
    return tags


def sampling(params: generation_pb2.SamplingParams) -> Sampling:
    def opt(name: str) -> object:
        return getattr(params, name) if params.HasField(name) else None

    return Sampling(
        temperature=opt("temperature"), top_p=opt("top_p"), top_k=opt("top_k"),  # type: ignore[arg-type]
        repetition_penalty=opt("repetition_penalty"), seed=opt("seed"),  # type: ignore[arg-type]
        stop=tuple(params.stop), max_tokens=opt("max_tokens"),  # type: ignore[arg-type]
    )


def messages(items: object) -> tuple[Message, ...]:
    return tuple(Message(enum_value(Role, m.role, "messages.role"), m.content) for m in items)  # type: ignore[attr-defined]


def prompt_texts(req: pb2.GenerateRequest | pb2.CompleteRequest | pb2.CountTokensRequest) -> list[tuple[str, str]]:
    """(field, text) of every text of the request meant for the model, for the size limits."""
    texts = [("prompt", req.prompt)]
    texts.extend((f"messages[{i}].content", m.content) for i, m in enumerate(req.messages))
    return texts


def task_texts(req: pb2.RunTaskRequest) -> list[tuple[str, str]]:
    texts = [("content", req.content), ("target_language", req.target_language), ("style", req.style)]
    texts.extend((f"labels[{i}]", label) for i, label in enumerate(req.labels))
    texts.extend((f"fields[{i}]", name) for i, name in enumerate(req.fields))
    return texts


def batch_item_texts(req: pb2.SubmitBatchRequest) -> list[list[tuple[str, str]]]:
    return [[(f"items[{i}].prompt", item.prompt),
             *((f"items[{i}].messages[{m}].content", message.content) for m, message in enumerate(item.messages))]
            for i, item in enumerate(req.items)]


def generation_request(req: pb2.GenerateRequest | pb2.CompleteRequest) -> GenerationRequest:
    options = getattr(req, "stream_options", None)
    return GenerationRequest(
        model=req.model, prompt=req.prompt, messages=messages(req.messages), sampling=sampling(req.sampling),
        context_id=req.context_id, tags=dict(req.tags), traffic_class=enum_value(TrafficClass, req.traffic_class, "traffic_class"),
        cache_policy=enum_value(CachePolicy, req.cache_policy, "cache_policy"), raw_prompt=req.raw_prompt,
        coalesce_ms=options.coalesce_ms if options is not None else 0,
        coalesce_tokens=options.coalesce_tokens if options is not None else 0,
    )


def money(value: Money) -> money_pb2.Money:
    return money_pb2.Money(currency_code=value.currency_code, micros=value.micros)


def usage(value: Usage) -> generation_pb2.Usage:
    return generation_pb2.Usage(prompt_tokens=value.prompt_tokens, completion_tokens=value.completion_tokens,
                                total_tokens=value.total_tokens, cached=value.cached)


def summary(value: Summary) -> pb2.GenerationSummary:
    return pb2.GenerationSummary(
        finish_reason=int(value.finish_reason), usage=usage(value.usage), cost=money(value.cost),  # type: ignore[arg-type]
        model=value.model, model_version=value.model_version, trace_id=value.trace_id,
        time_to_first_token_ms=value.time_to_first_token_ms,
    )


def timestamp(value: datetime | None) -> Timestamp | None:
    if value is None:
        return None
    stamp = Timestamp()
    stamp.FromDatetime(value)
    return stamp


def api_key(record: ApiKeyRecord) -> admin_pb2.ApiKey:
    return admin_pb2.ApiKey(
        key_id=record.key_id, prefix=record.prefix, tenant_id=record.tenant_id, name=record.name,
        allowed_models=list(record.allowed_models),
        limits=admin_pb2.KeyLimits(requests_per_minute=record.requests_per_minute,
                                   tokens_per_minute=record.tokens_per_minute),
        traffic_class=int(record.traffic_class),  # type: ignore[arg-type]
        create_time=timestamp(record.create_time), revoke_time=timestamp(record.revoke_time),
        expire_time=timestamp(record.expire_time),
    )


def new_api_key(req: admin_pb2.CreateApiKeyRequest) -> NewApiKey:
    expire = req.expire_time.ToDatetime(tzinfo=UTC) if req.HasField("expire_time") else None
    return NewApiKey(
        tenant_id=req.tenant_id, name=req.name, allowed_models=tuple(req.allowed_models),
        requests_per_minute=req.limits.requests_per_minute, tokens_per_minute=req.limits.tokens_per_minute,
        traffic_class=TrafficClass(req.traffic_class or TrafficClass.INTERACTIVE), expire_time=expire,
    )


def default_sampling(request: admin_pb2.RegisterModelVersionRequest) -> Sampling | None:
    """The version's default sampling when the request sets it (floats read back at float32's precision,
    so 0.2 stays 0.2)."""
    if not request.HasField("default_sampling"):
        return None
    values = sampling(request.default_sampling)

    def exact(value: float | None) -> float | None:
        return None if value is None else float(f"{value:.7g}")

    return replace(values, temperature=exact(values.temperature), top_p=exact(values.top_p),
                   repetition_penalty=exact(values.repetition_penalty))


def canary_policy(value: admin_pb2.CanaryPolicy) -> CanaryPolicy:
    default = CanaryPolicy()
    return CanaryPolicy(
        max_error_permille=value.max_error_permille or default.max_error_permille,
        max_p99_s=value.max_p99_latency.ToTimedelta().total_seconds() if value.HasField("max_p99_latency")
        else default.max_p99_s,
        window_s=value.window.ToTimedelta().total_seconds() if value.HasField("window") else default.window_s,
        min_requests=value.min_requests or default.min_requests,
    )


def _duration(seconds: float) -> Duration:
    duration = Duration()
    duration.FromNanoseconds(int(seconds * 1e9))
    return duration


def version_state(value: int, field: str) -> VersionState:
    if value == 0:
        accepted = ", ".join(s.name for s in VersionState)
        raise InvalidInput(f"{field} is required: one of {accepted}", field=field)
    return enum_value(VersionState, value, field)


def state_change(change: StateChange) -> model_lifecycle_pb2.VersionStateChange:
    return model_lifecycle_pb2.VersionStateChange(
        time=timestamp(change.time), from_state=int(change.from_state or 0),  # type: ignore[arg-type]
        to_state=int(change.to_state), operator=change.actor, reason=change.reason)  # type: ignore[arg-type]


def model_record(model: ModelEntry, healthy: dict[str, int],
                 history: list[StateChange] | None = None) -> admin_pb2.ModelRecord:
    changes = history or []
    return admin_pb2.ModelRecord(
        name=model.name, fallback_models=list(model.fallback_models), context_window=model.context_window,
        versions=[
            admin_pb2.VersionRecord(
                version=v.version, replicas=[admin_pb2.Replica(address=a) for a in v.replicas],
                weight_permille=v.weight_permille, healthy_replicas=healthy.get(v.version, 0), stable=v.stable,
                canary_policy=admin_pb2.CanaryPolicy(
                    max_error_permille=v.canary.max_error_permille, max_p99_latency=_duration(v.canary.max_p99_s),
                    window=_duration(v.canary.window_s), min_requests=v.canary.min_requests,
                ),
                default_sampling=sampling_to_proto(v.default_sampling),
                state=int(v.state),  # type: ignore[arg-type]
                history=[state_change(c) for c in changes if c.version == v.version],
            )
            for v in model.versions
        ],
    )


def model_summary(model: ModelEntry, healthy: dict[str, int]) -> pb2.ModelSummary:
    return pb2.ModelSummary(
        name=model.name, default_version=model.default_version.version, context_window=model.context_window,
        versions=[pb2.VersionSummary(version=v.version, weight_permille=v.weight_permille,
                                     healthy_replicas=healthy.get(v.version, 0),
                                     default_sampling=sampling_to_proto(v.default_sampling),
                                     state=int(v.state))  # type: ignore[arg-type]
                  for v in model.versions],
    )


def policy_from_proto(value: admin_pb2.Policy) -> Policy:
    return Policy(name=value.name, blocked_terms=tuple(value.blocked_terms), max_prompt_tokens=value.max_prompt_tokens,
                  max_tokens_cap=value.max_tokens_cap, normalize_cache_keys=value.normalize_cache_keys,
                  shared_cache_models=tuple(value.shared_cache_models))


def policy_to_proto(value: Policy) -> admin_pb2.Policy:
    return admin_pb2.Policy(name=value.name, blocked_terms=list(value.blocked_terms),
                            max_prompt_tokens=value.max_prompt_tokens, max_tokens_cap=value.max_tokens_cap,
                            normalize_cache_keys=value.normalize_cache_keys,
                            shared_cache_models=list(value.shared_cache_models))


def new_job(req: pb2.SubmitBatchRequest) -> NewJob:
    deadline = req.deadline.ToDatetime(tzinfo=UTC) if req.HasField("deadline") else None
    items = tuple(ItemSpec(i.custom_id, i.prompt, messages(i.messages), sampling(i.sampling)) for i in req.items)
    return NewJob(model=req.model, items=items, deadline=deadline, tags=dict(req.tags),
                  idempotency_key=req.idempotency_key)


def batch_result(value: ItemResult) -> pb2.BatchResult:
    return pb2.BatchResult(
        custom_id=value.custom_id, text=value.text, finish_reason=int(value.finish_reason),  # type: ignore[arg-type]
        usage=usage(value.usage), error_code=value.error_code, error_message=value.error_message,
    )


def job(value: Job) -> pb2.Job:
    return pb2.Job(
        job_id=value.job_id, state=int(value.state), model=value.model,  # type: ignore[arg-type]
        create_time=timestamp(value.create_time), deadline=timestamp(value.deadline),
        end_time=timestamp(value.end_time), total_items=value.total_items, completed_items=value.completed_items,
        failed_items=value.failed_items, results=[batch_result(r) for r in value.results], usage=usage(value.usage),
        cost=money(value.cost), tags=value.tags,
    )


def audit_event(event: AuditEvent) -> admin_pb2.AuditEvent:
    details = Struct()
    details.update(event.details)
    return admin_pb2.AuditEvent(sequence=event.sequence, time=timestamp(event.time), actor=event.actor,
                                action=event.action, target=event.target, details=details)
