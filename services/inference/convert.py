"""Protobuf <-> engine dataclasses (the only place that knows both)."""

from __future__ import annotations

from collections.abc import Iterable

from google.protobuf.timestamp_pb2 import Timestamp

from autoglm.common.v1 import generation_pb2
from autoglm.inference.v1 import inference_service_pb2 as pb2
from services.common.errors import InvalidInput
from services.common.generation import ChatMessage, Role, Sampling, TrafficClass
from services.inference.engine.types import (
    Attribution,
    Delta,
    GenerationRequest,
    LoadReport,
    ModelInfo,
    StreamSettings,
)

_ROLES = {int(role) for role in Role if role != Role.UNSPECIFIED}
_CLASSES = {generation_pb2.TRAFFIC_CLASS_CORE: TrafficClass.CORE,
            generation_pb2.TRAFFIC_CLASS_INTERACTIVE: TrafficClass.INTERACTIVE,
            generation_pb2.TRAFFIC_CLASS_BATCH: TrafficClass.BATCH,
            generation_pb2.TRAFFIC_CLASS_UNSPECIFIED: TrafficClass.INTERACTIVE}


def messages(items: Iterable[generation_pb2.ChatMessage]) -> tuple[ChatMessage, ...]:
    out = []
    for index, message in enumerate(items):
        if message.role not in _ROLES:
            raise InvalidInput(f"messages[{index}].role must be SYSTEM, USER or ASSISTANT", field=f"messages[{index}].role")
        out.append(ChatMessage(Role(message.role), message.content))
    return tuple(out)


def generation_request(request: pb2.GenerateRequest) -> GenerationRequest:
    s = request.sampling
    sampling = Sampling(
        temperature=s.temperature if s.HasField("temperature") else None,
        top_p=s.top_p if s.HasField("top_p") else None,
        top_k=s.top_k if s.HasField("top_k") else None,
        repetition_penalty=s.repetition_penalty if s.HasField("repetition_penalty") else None,
        seed=s.seed if s.HasField("seed") else None,
        stop=tuple(s.stop),
        max_tokens=s.max_tokens if s.HasField("max_tokens") else None,
    )
    options = request.stream_options
    if options.coalesce_ms < 0 or options.coalesce_tokens < 0:
        raise InvalidInput("stream_options.coalesce_ms and coalesce_tokens must be >= 0", field="stream_options")
    return GenerationRequest(
        request_id=request.request_id, prompt=request.prompt, messages=messages(request.messages),
        sampling=sampling, traffic_class=_CLASSES.get(request.traffic_class, TrafficClass.INTERACTIVE),
        stream=StreamSettings(options.coalesce_ms, options.coalesce_tokens), tenant_id=request.tenant_id,
        attribution=Attribution(api_key_id=request.api_key_id, model=request.model,
                                model_version=request.model_version, tags=tuple(sorted(request.tags.items())),
                                router_id=request.router_id, trace_id=request.trace_id))


def generate_response(delta: Delta) -> pb2.GenerateResponse:
    response = pb2.GenerateResponse(delta=delta.text, token_ids=list(delta.token_ids))
    if delta.finish_reason is not None:
        response.finish_reason = generation_pb2.FinishReason.ValueType(delta.finish_reason)
    if delta.usage is not None:
        response.usage.prompt_tokens = delta.usage.prompt_tokens
        response.usage.completion_tokens = delta.usage.completion_tokens
        response.usage.total_tokens = delta.usage.total_tokens
    return response


def model_info(info: ModelInfo) -> pb2.GetModelInfoResponse:
    return pb2.GetModelInfoResponse(
        name=info.name, version=info.version, context_window=info.context_window, vocab_size=info.vocab_size,
        precision=pb2.Precision.Value(f"PRECISION_{info.precision}"), execution_provider=info.execution_provider,
        manifest_sha256=info.manifest_sha256, max_batch_size=info.max_batch_size, replica_id=info.replica_id)


def load_report(report: LoadReport) -> pb2.WatchLoadResponse:
    now = Timestamp()
    now.GetCurrentTime()
    return pb2.WatchLoadResponse(
        replica_id=report.replica_id, time=now, queue_depth=report.queue_depth,
        queue_capacity=report.queue_capacity, active_sequences=report.active_sequences,
        max_batch_size=report.max_batch_size, kv_cache_tokens=report.kv_cache_tokens,
        kv_cache_bytes=report.kv_cache_bytes, tokens_per_second=report.tokens_per_second,
        cancelled_total=report.cancelled_total, ready=report.ready,
        prefill_tokens_total=report.prefill_tokens_total, prefix_cache_hits=report.prefix_cache_hits,
        prefix_cache_misses=report.prefix_cache_misses, prefix_cache_blocks=report.prefix_cache_blocks,
        prefix_cache_bytes=report.prefix_cache_bytes, kv_budget_bytes=report.kv_budget_bytes)
