import datetime

from autoglm.common.v1 import generation_pb2 as _generation_pb2
from autoglm.common.v1 import money_pb2 as _money_pb2
from autoglm.router.v1 import model_lifecycle_pb2 as _model_lifecycle_pb2
from google.protobuf import duration_pb2 as _duration_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class CachePolicy(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CACHE_POLICY_UNSPECIFIED: _ClassVar[CachePolicy]
    CACHE_POLICY_BYPASS: _ClassVar[CachePolicy]
    CACHE_POLICY_ALLOW_SAMPLED: _ClassVar[CachePolicy]

class TaskKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TASK_KIND_UNSPECIFIED: _ClassVar[TaskKind]
    TASK_KIND_SUMMARIZE: _ClassVar[TaskKind]
    TASK_KIND_TRANSLATE: _ClassVar[TaskKind]
    TASK_KIND_CLASSIFY: _ClassVar[TaskKind]
    TASK_KIND_EXTRACT: _ClassVar[TaskKind]
    TASK_KIND_REWRITE: _ClassVar[TaskKind]

class OutputFormat(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    OUTPUT_FORMAT_UNSPECIFIED: _ClassVar[OutputFormat]
    OUTPUT_FORMAT_TEXT: _ClassVar[OutputFormat]
    OUTPUT_FORMAT_BULLETS: _ClassVar[OutputFormat]
    OUTPUT_FORMAT_JSON: _ClassVar[OutputFormat]
    OUTPUT_FORMAT_MARKDOWN: _ClassVar[OutputFormat]

class LengthUnit(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    LENGTH_UNIT_UNSPECIFIED: _ClassVar[LengthUnit]
    LENGTH_UNIT_WORDS: _ClassVar[LengthUnit]
    LENGTH_UNIT_SENTENCES: _ClassVar[LengthUnit]
    LENGTH_UNIT_BULLETS: _ClassVar[LengthUnit]

class JobState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    JOB_STATE_UNSPECIFIED: _ClassVar[JobState]
    JOB_STATE_QUEUED: _ClassVar[JobState]
    JOB_STATE_RUNNING: _ClassVar[JobState]
    JOB_STATE_PAUSED: _ClassVar[JobState]
    JOB_STATE_SUCCEEDED: _ClassVar[JobState]
    JOB_STATE_FAILED: _ClassVar[JobState]
    JOB_STATE_CANCELLED: _ClassVar[JobState]

class WorkflowState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    WORKFLOW_STATE_UNSPECIFIED: _ClassVar[WorkflowState]
    WORKFLOW_STATE_QUEUED: _ClassVar[WorkflowState]
    WORKFLOW_STATE_RUNNING: _ClassVar[WorkflowState]
    WORKFLOW_STATE_PAUSED: _ClassVar[WorkflowState]
    WORKFLOW_STATE_SUCCEEDED: _ClassVar[WorkflowState]
    WORKFLOW_STATE_FAILED: _ClassVar[WorkflowState]
    WORKFLOW_STATE_CANCELLED: _ClassVar[WorkflowState]

class NodeState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    NODE_STATE_UNSPECIFIED: _ClassVar[NodeState]
    NODE_STATE_WAITING: _ClassVar[NodeState]
    NODE_STATE_RUNNING: _ClassVar[NodeState]
    NODE_STATE_SUCCEEDED: _ClassVar[NodeState]
    NODE_STATE_FAILED: _ClassVar[NodeState]
    NODE_STATE_UPSTREAM_FAILED: _ClassVar[NodeState]
    NODE_STATE_CANCELLED: _ClassVar[NodeState]
CACHE_POLICY_UNSPECIFIED: CachePolicy
CACHE_POLICY_BYPASS: CachePolicy
CACHE_POLICY_ALLOW_SAMPLED: CachePolicy
TASK_KIND_UNSPECIFIED: TaskKind
TASK_KIND_SUMMARIZE: TaskKind
TASK_KIND_TRANSLATE: TaskKind
TASK_KIND_CLASSIFY: TaskKind
TASK_KIND_EXTRACT: TaskKind
TASK_KIND_REWRITE: TaskKind
OUTPUT_FORMAT_UNSPECIFIED: OutputFormat
OUTPUT_FORMAT_TEXT: OutputFormat
OUTPUT_FORMAT_BULLETS: OutputFormat
OUTPUT_FORMAT_JSON: OutputFormat
OUTPUT_FORMAT_MARKDOWN: OutputFormat
LENGTH_UNIT_UNSPECIFIED: LengthUnit
LENGTH_UNIT_WORDS: LengthUnit
LENGTH_UNIT_SENTENCES: LengthUnit
LENGTH_UNIT_BULLETS: LengthUnit
JOB_STATE_UNSPECIFIED: JobState
JOB_STATE_QUEUED: JobState
JOB_STATE_RUNNING: JobState
JOB_STATE_PAUSED: JobState
JOB_STATE_SUCCEEDED: JobState
JOB_STATE_FAILED: JobState
JOB_STATE_CANCELLED: JobState
WORKFLOW_STATE_UNSPECIFIED: WorkflowState
WORKFLOW_STATE_QUEUED: WorkflowState
WORKFLOW_STATE_RUNNING: WorkflowState
WORKFLOW_STATE_PAUSED: WorkflowState
WORKFLOW_STATE_SUCCEEDED: WorkflowState
WORKFLOW_STATE_FAILED: WorkflowState
WORKFLOW_STATE_CANCELLED: WorkflowState
NODE_STATE_UNSPECIFIED: NodeState
NODE_STATE_WAITING: NodeState
NODE_STATE_RUNNING: NodeState
NODE_STATE_SUCCEEDED: NodeState
NODE_STATE_FAILED: NodeState
NODE_STATE_UPSTREAM_FAILED: NodeState
NODE_STATE_CANCELLED: NodeState

class GenerateRequest(_message.Message):
    __slots__ = ("model", "prompt", "messages", "sampling", "context_id", "tags", "traffic_class", "cache_policy", "raw_prompt", "stream_options")
    class TagsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_ID_FIELD_NUMBER: _ClassVar[int]
    TAGS_FIELD_NUMBER: _ClassVar[int]
    TRAFFIC_CLASS_FIELD_NUMBER: _ClassVar[int]
    CACHE_POLICY_FIELD_NUMBER: _ClassVar[int]
    RAW_PROMPT_FIELD_NUMBER: _ClassVar[int]
    STREAM_OPTIONS_FIELD_NUMBER: _ClassVar[int]
    model: str
    prompt: str
    messages: _containers.RepeatedCompositeFieldContainer[_generation_pb2.ChatMessage]
    sampling: _generation_pb2.SamplingParams
    context_id: str
    tags: _containers.ScalarMap[str, str]
    traffic_class: _generation_pb2.TrafficClass
    cache_policy: CachePolicy
    raw_prompt: bool
    stream_options: _generation_pb2.StreamOptions
    def __init__(self, model: _Optional[str] = ..., prompt: _Optional[str] = ..., messages: _Optional[_Iterable[_Union[_generation_pb2.ChatMessage, _Mapping]]] = ..., sampling: _Optional[_Union[_generation_pb2.SamplingParams, _Mapping]] = ..., context_id: _Optional[str] = ..., tags: _Optional[_Mapping[str, str]] = ..., traffic_class: _Optional[_Union[_generation_pb2.TrafficClass, str]] = ..., cache_policy: _Optional[_Union[CachePolicy, str]] = ..., raw_prompt: _Optional[bool] = ..., stream_options: _Optional[_Union[_generation_pb2.StreamOptions, _Mapping]] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("id", "delta", "delta_tokens", "summary")
    ID_FIELD_NUMBER: _ClassVar[int]
    DELTA_FIELD_NUMBER: _ClassVar[int]
    DELTA_TOKENS_FIELD_NUMBER: _ClassVar[int]
    SUMMARY_FIELD_NUMBER: _ClassVar[int]
    id: str
    delta: str
    delta_tokens: int
    summary: GenerationSummary
    def __init__(self, id: _Optional[str] = ..., delta: _Optional[str] = ..., delta_tokens: _Optional[int] = ..., summary: _Optional[_Union[GenerationSummary, _Mapping]] = ...) -> None: ...

class GenerationSummary(_message.Message):
    __slots__ = ("finish_reason", "usage", "cost", "model", "model_version", "trace_id", "time_to_first_token_ms")
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    COST_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    TRACE_ID_FIELD_NUMBER: _ClassVar[int]
    TIME_TO_FIRST_TOKEN_MS_FIELD_NUMBER: _ClassVar[int]
    finish_reason: _generation_pb2.FinishReason
    usage: _generation_pb2.Usage
    cost: _money_pb2.Money
    model: str
    model_version: str
    trace_id: str
    time_to_first_token_ms: int
    def __init__(self, finish_reason: _Optional[_Union[_generation_pb2.FinishReason, str]] = ..., usage: _Optional[_Union[_generation_pb2.Usage, _Mapping]] = ..., cost: _Optional[_Union[_money_pb2.Money, _Mapping]] = ..., model: _Optional[str] = ..., model_version: _Optional[str] = ..., trace_id: _Optional[str] = ..., time_to_first_token_ms: _Optional[int] = ...) -> None: ...

class CompleteRequest(_message.Message):
    __slots__ = ("model", "prompt", "messages", "sampling", "context_id", "tags", "traffic_class", "cache_policy", "raw_prompt")
    class TagsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_ID_FIELD_NUMBER: _ClassVar[int]
    TAGS_FIELD_NUMBER: _ClassVar[int]
    TRAFFIC_CLASS_FIELD_NUMBER: _ClassVar[int]
    CACHE_POLICY_FIELD_NUMBER: _ClassVar[int]
    RAW_PROMPT_FIELD_NUMBER: _ClassVar[int]
    model: str
    prompt: str
    messages: _containers.RepeatedCompositeFieldContainer[_generation_pb2.ChatMessage]
    sampling: _generation_pb2.SamplingParams
    context_id: str
    tags: _containers.ScalarMap[str, str]
    traffic_class: _generation_pb2.TrafficClass
    cache_policy: CachePolicy
    raw_prompt: bool
    def __init__(self, model: _Optional[str] = ..., prompt: _Optional[str] = ..., messages: _Optional[_Iterable[_Union[_generation_pb2.ChatMessage, _Mapping]]] = ..., sampling: _Optional[_Union[_generation_pb2.SamplingParams, _Mapping]] = ..., context_id: _Optional[str] = ..., tags: _Optional[_Mapping[str, str]] = ..., traffic_class: _Optional[_Union[_generation_pb2.TrafficClass, str]] = ..., cache_policy: _Optional[_Union[CachePolicy, str]] = ..., raw_prompt: _Optional[bool] = ...) -> None: ...

class Choice(_message.Message):
    __slots__ = ("index", "text", "finish_reason")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    index: int
    text: str
    finish_reason: _generation_pb2.FinishReason
    def __init__(self, index: _Optional[int] = ..., text: _Optional[str] = ..., finish_reason: _Optional[_Union[_generation_pb2.FinishReason, str]] = ...) -> None: ...

class CompleteResponse(_message.Message):
    __slots__ = ("id", "choices", "usage", "cost", "model", "model_version", "trace_id")
    ID_FIELD_NUMBER: _ClassVar[int]
    CHOICES_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    COST_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    TRACE_ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    choices: _containers.RepeatedCompositeFieldContainer[Choice]
    usage: _generation_pb2.Usage
    cost: _money_pb2.Money
    model: str
    model_version: str
    trace_id: str
    def __init__(self, id: _Optional[str] = ..., choices: _Optional[_Iterable[_Union[Choice, _Mapping]]] = ..., usage: _Optional[_Union[_generation_pb2.Usage, _Mapping]] = ..., cost: _Optional[_Union[_money_pb2.Money, _Mapping]] = ..., model: _Optional[str] = ..., model_version: _Optional[str] = ..., trace_id: _Optional[str] = ...) -> None: ...

class TargetLength(_message.Message):
    __slots__ = ("unit", "value")
    UNIT_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    unit: LengthUnit
    value: int
    def __init__(self, unit: _Optional[_Union[LengthUnit, str]] = ..., value: _Optional[int] = ...) -> None: ...

class RunTaskRequest(_message.Message):
    __slots__ = ("model", "kind", "content", "target_length", "output_format", "target_language", "labels", "fields", "style", "sampling", "tags", "traffic_class")
    class TagsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    MODEL_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    TARGET_LENGTH_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FORMAT_FIELD_NUMBER: _ClassVar[int]
    TARGET_LANGUAGE_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    FIELDS_FIELD_NUMBER: _ClassVar[int]
    STYLE_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    TAGS_FIELD_NUMBER: _ClassVar[int]
    TRAFFIC_CLASS_FIELD_NUMBER: _ClassVar[int]
    model: str
    kind: TaskKind
    content: str
    target_length: TargetLength
    output_format: OutputFormat
    target_language: str
    labels: _containers.RepeatedScalarFieldContainer[str]
    fields: _containers.RepeatedScalarFieldContainer[str]
    style: str
    sampling: _generation_pb2.SamplingParams
    tags: _containers.ScalarMap[str, str]
    traffic_class: _generation_pb2.TrafficClass
    def __init__(self, model: _Optional[str] = ..., kind: _Optional[_Union[TaskKind, str]] = ..., content: _Optional[str] = ..., target_length: _Optional[_Union[TargetLength, _Mapping]] = ..., output_format: _Optional[_Union[OutputFormat, str]] = ..., target_language: _Optional[str] = ..., labels: _Optional[_Iterable[str]] = ..., fields: _Optional[_Iterable[str]] = ..., style: _Optional[str] = ..., sampling: _Optional[_Union[_generation_pb2.SamplingParams, _Mapping]] = ..., tags: _Optional[_Mapping[str, str]] = ..., traffic_class: _Optional[_Union[_generation_pb2.TrafficClass, str]] = ...) -> None: ...

class RunTaskResponse(_message.Message):
    __slots__ = ("id", "output", "finish_reason", "usage", "cost", "model", "model_version")
    ID_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    COST_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    id: str
    output: str
    finish_reason: _generation_pb2.FinishReason
    usage: _generation_pb2.Usage
    cost: _money_pb2.Money
    model: str
    model_version: str
    def __init__(self, id: _Optional[str] = ..., output: _Optional[str] = ..., finish_reason: _Optional[_Union[_generation_pb2.FinishReason, str]] = ..., usage: _Optional[_Union[_generation_pb2.Usage, _Mapping]] = ..., cost: _Optional[_Union[_money_pb2.Money, _Mapping]] = ..., model: _Optional[str] = ..., model_version: _Optional[str] = ...) -> None: ...

class CountTokensRequest(_message.Message):
    __slots__ = ("model", "prompt", "messages", "raw_prompt")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    RAW_PROMPT_FIELD_NUMBER: _ClassVar[int]
    model: str
    prompt: str
    messages: _containers.RepeatedCompositeFieldContainer[_generation_pb2.ChatMessage]
    raw_prompt: bool
    def __init__(self, model: _Optional[str] = ..., prompt: _Optional[str] = ..., messages: _Optional[_Iterable[_Union[_generation_pb2.ChatMessage, _Mapping]]] = ..., raw_prompt: _Optional[bool] = ...) -> None: ...

class CountTokensResponse(_message.Message):
    __slots__ = ("token_count", "context_window", "model", "model_version")
    TOKEN_COUNT_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_WINDOW_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    token_count: int
    context_window: int
    model: str
    model_version: str
    def __init__(self, token_count: _Optional[int] = ..., context_window: _Optional[int] = ..., model: _Optional[str] = ..., model_version: _Optional[str] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelSummary]
    def __init__(self, models: _Optional[_Iterable[_Union[ModelSummary, _Mapping]]] = ...) -> None: ...

class ModelSummary(_message.Message):
    __slots__ = ("name", "default_version", "versions", "context_window")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_VERSION_FIELD_NUMBER: _ClassVar[int]
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_WINDOW_FIELD_NUMBER: _ClassVar[int]
    name: str
    default_version: str
    versions: _containers.RepeatedCompositeFieldContainer[VersionSummary]
    context_window: int
    def __init__(self, name: _Optional[str] = ..., default_version: _Optional[str] = ..., versions: _Optional[_Iterable[_Union[VersionSummary, _Mapping]]] = ..., context_window: _Optional[int] = ...) -> None: ...

class VersionSummary(_message.Message):
    __slots__ = ("version", "weight_permille", "healthy_replicas", "default_sampling", "state")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_PERMILLE_FIELD_NUMBER: _ClassVar[int]
    HEALTHY_REPLICAS_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_SAMPLING_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    version: str
    weight_permille: int
    healthy_replicas: int
    default_sampling: _generation_pb2.SamplingParams
    state: _model_lifecycle_pb2.VersionState
    def __init__(self, version: _Optional[str] = ..., weight_permille: _Optional[int] = ..., healthy_replicas: _Optional[int] = ..., default_sampling: _Optional[_Union[_generation_pb2.SamplingParams, _Mapping]] = ..., state: _Optional[_Union[_model_lifecycle_pb2.VersionState, str]] = ...) -> None: ...

class BatchItem(_message.Message):
    __slots__ = ("custom_id", "prompt", "messages", "sampling")
    CUSTOM_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    custom_id: str
    prompt: str
    messages: _containers.RepeatedCompositeFieldContainer[_generation_pb2.ChatMessage]
    sampling: _generation_pb2.SamplingParams
    def __init__(self, custom_id: _Optional[str] = ..., prompt: _Optional[str] = ..., messages: _Optional[_Iterable[_Union[_generation_pb2.ChatMessage, _Mapping]]] = ..., sampling: _Optional[_Union[_generation_pb2.SamplingParams, _Mapping]] = ...) -> None: ...

class SubmitBatchRequest(_message.Message):
    __slots__ = ("model", "items", "deadline", "tags", "idempotency_key")
    class TagsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    MODEL_FIELD_NUMBER: _ClassVar[int]
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_FIELD_NUMBER: _ClassVar[int]
    TAGS_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    model: str
    items: _containers.RepeatedCompositeFieldContainer[BatchItem]
    deadline: _timestamp_pb2.Timestamp
    tags: _containers.ScalarMap[str, str]
    idempotency_key: str
    def __init__(self, model: _Optional[str] = ..., items: _Optional[_Iterable[_Union[BatchItem, _Mapping]]] = ..., deadline: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., tags: _Optional[_Mapping[str, str]] = ..., idempotency_key: _Optional[str] = ...) -> None: ...

class SubmitBatchResponse(_message.Message):
    __slots__ = ("job",)
    JOB_FIELD_NUMBER: _ClassVar[int]
    job: Job
    def __init__(self, job: _Optional[_Union[Job, _Mapping]] = ...) -> None: ...

class Job(_message.Message):
    __slots__ = ("job_id", "state", "model", "create_time", "deadline", "end_time", "total_items", "completed_items", "failed_items", "results", "usage", "cost", "tags")
    class TagsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_FIELD_NUMBER: _ClassVar[int]
    END_TIME_FIELD_NUMBER: _ClassVar[int]
    TOTAL_ITEMS_FIELD_NUMBER: _ClassVar[int]
    COMPLETED_ITEMS_FIELD_NUMBER: _ClassVar[int]
    FAILED_ITEMS_FIELD_NUMBER: _ClassVar[int]
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    COST_FIELD_NUMBER: _ClassVar[int]
    TAGS_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    state: JobState
    model: str
    create_time: _timestamp_pb2.Timestamp
    deadline: _timestamp_pb2.Timestamp
    end_time: _timestamp_pb2.Timestamp
    total_items: int
    completed_items: int
    failed_items: int
    results: _containers.RepeatedCompositeFieldContainer[BatchResult]
    usage: _generation_pb2.Usage
    cost: _money_pb2.Money
    tags: _containers.ScalarMap[str, str]
    def __init__(self, job_id: _Optional[str] = ..., state: _Optional[_Union[JobState, str]] = ..., model: _Optional[str] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., deadline: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., end_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., total_items: _Optional[int] = ..., completed_items: _Optional[int] = ..., failed_items: _Optional[int] = ..., results: _Optional[_Iterable[_Union[BatchResult, _Mapping]]] = ..., usage: _Optional[_Union[_generation_pb2.Usage, _Mapping]] = ..., cost: _Optional[_Union[_money_pb2.Money, _Mapping]] = ..., tags: _Optional[_Mapping[str, str]] = ...) -> None: ...

class BatchResult(_message.Message):
    __slots__ = ("custom_id", "text", "finish_reason", "usage", "error_code", "error_message")
    CUSTOM_ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    ERROR_CODE_FIELD_NUMBER: _ClassVar[int]
    ERROR_MESSAGE_FIELD_NUMBER: _ClassVar[int]
    custom_id: str
    text: str
    finish_reason: _generation_pb2.FinishReason
    usage: _generation_pb2.Usage
    error_code: str
    error_message: str
    def __init__(self, custom_id: _Optional[str] = ..., text: _Optional[str] = ..., finish_reason: _Optional[_Union[_generation_pb2.FinishReason, str]] = ..., usage: _Optional[_Union[_generation_pb2.Usage, _Mapping]] = ..., error_code: _Optional[str] = ..., error_message: _Optional[str] = ...) -> None: ...

class GetJobRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class GetJobResponse(_message.Message):
    __slots__ = ("job",)
    JOB_FIELD_NUMBER: _ClassVar[int]
    job: Job
    def __init__(self, job: _Optional[_Union[Job, _Mapping]] = ...) -> None: ...

class ListJobsRequest(_message.Message):
    __slots__ = ("page_size", "page_token", "state")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    state: JobState
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ..., state: _Optional[_Union[JobState, str]] = ...) -> None: ...

class ListJobsResponse(_message.Message):
    __slots__ = ("jobs", "next_page_token")
    JOBS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    jobs: _containers.RepeatedCompositeFieldContainer[Job]
    next_page_token: str
    def __init__(self, jobs: _Optional[_Iterable[_Union[Job, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class CancelJobRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class CancelJobResponse(_message.Message):
    __slots__ = ("job",)
    JOB_FIELD_NUMBER: _ClassVar[int]
    job: Job
    def __init__(self, job: _Optional[_Union[Job, _Mapping]] = ...) -> None: ...

class RetryPolicy(_message.Message):
    __slots__ = ("max_attempts", "backoff")
    MAX_ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    BACKOFF_FIELD_NUMBER: _ClassVar[int]
    max_attempts: int
    backoff: _duration_pb2.Duration
    def __init__(self, max_attempts: _Optional[int] = ..., backoff: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ...) -> None: ...

class WorkflowNode(_message.Message):
    __slots__ = ("id", "kind", "prompt", "messages", "content", "target_length", "output_format", "target_language", "labels", "fields", "style", "depends_on", "model", "sampling", "retry", "timeout")
    ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    TARGET_LENGTH_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FORMAT_FIELD_NUMBER: _ClassVar[int]
    TARGET_LANGUAGE_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    FIELDS_FIELD_NUMBER: _ClassVar[int]
    STYLE_FIELD_NUMBER: _ClassVar[int]
    DEPENDS_ON_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    RETRY_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_FIELD_NUMBER: _ClassVar[int]
    id: str
    kind: TaskKind
    prompt: str
    messages: _containers.RepeatedCompositeFieldContainer[_generation_pb2.ChatMessage]
    content: str
    target_length: TargetLength
    output_format: OutputFormat
    target_language: str
    labels: _containers.RepeatedScalarFieldContainer[str]
    fields: _containers.RepeatedScalarFieldContainer[str]
    style: str
    depends_on: _containers.RepeatedScalarFieldContainer[str]
    model: str
    sampling: _generation_pb2.SamplingParams
    retry: RetryPolicy
    timeout: _duration_pb2.Duration
    def __init__(self, id: _Optional[str] = ..., kind: _Optional[_Union[TaskKind, str]] = ..., prompt: _Optional[str] = ..., messages: _Optional[_Iterable[_Union[_generation_pb2.ChatMessage, _Mapping]]] = ..., content: _Optional[str] = ..., target_length: _Optional[_Union[TargetLength, _Mapping]] = ..., output_format: _Optional[_Union[OutputFormat, str]] = ..., target_language: _Optional[str] = ..., labels: _Optional[_Iterable[str]] = ..., fields: _Optional[_Iterable[str]] = ..., style: _Optional[str] = ..., depends_on: _Optional[_Iterable[str]] = ..., model: _Optional[str] = ..., sampling: _Optional[_Union[_generation_pb2.SamplingParams, _Mapping]] = ..., retry: _Optional[_Union[RetryPolicy, _Mapping]] = ..., timeout: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ...) -> None: ...

class SubmitWorkflowRequest(_message.Message):
    __slots__ = ("name", "model", "nodes", "traffic_class", "deadline", "tags", "max_concurrency", "dry_run", "require_budget")
    class TagsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    NODES_FIELD_NUMBER: _ClassVar[int]
    TRAFFIC_CLASS_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_FIELD_NUMBER: _ClassVar[int]
    TAGS_FIELD_NUMBER: _ClassVar[int]
    MAX_CONCURRENCY_FIELD_NUMBER: _ClassVar[int]
    DRY_RUN_FIELD_NUMBER: _ClassVar[int]
    REQUIRE_BUDGET_FIELD_NUMBER: _ClassVar[int]
    name: str
    model: str
    nodes: _containers.RepeatedCompositeFieldContainer[WorkflowNode]
    traffic_class: _generation_pb2.TrafficClass
    deadline: _timestamp_pb2.Timestamp
    tags: _containers.ScalarMap[str, str]
    max_concurrency: int
    dry_run: bool
    require_budget: bool
    def __init__(self, name: _Optional[str] = ..., model: _Optional[str] = ..., nodes: _Optional[_Iterable[_Union[WorkflowNode, _Mapping]]] = ..., traffic_class: _Optional[_Union[_generation_pb2.TrafficClass, str]] = ..., deadline: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., tags: _Optional[_Mapping[str, str]] = ..., max_concurrency: _Optional[int] = ..., dry_run: _Optional[bool] = ..., require_budget: _Optional[bool] = ...) -> None: ...

class WorkflowEstimate(_message.Message):
    __slots__ = ("prompt_tokens", "completion_tokens", "cost")
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COST_FIELD_NUMBER: _ClassVar[int]
    prompt_tokens: int
    completion_tokens: int
    cost: _money_pb2.Money
    def __init__(self, prompt_tokens: _Optional[int] = ..., completion_tokens: _Optional[int] = ..., cost: _Optional[_Union[_money_pb2.Money, _Mapping]] = ...) -> None: ...

class SubmitWorkflowResponse(_message.Message):
    __slots__ = ("workflow", "estimate")
    WORKFLOW_FIELD_NUMBER: _ClassVar[int]
    ESTIMATE_FIELD_NUMBER: _ClassVar[int]
    workflow: Workflow
    estimate: WorkflowEstimate
    def __init__(self, workflow: _Optional[_Union[Workflow, _Mapping]] = ..., estimate: _Optional[_Union[WorkflowEstimate, _Mapping]] = ...) -> None: ...

class NodeStatus(_message.Message):
    __slots__ = ("id", "state", "kind", "depends_on", "attempt", "runs", "output", "fields", "usage", "cost", "error_code", "error_message", "start_time", "end_time")
    class FieldsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    DEPENDS_ON_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    RUNS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    FIELDS_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    COST_FIELD_NUMBER: _ClassVar[int]
    ERROR_CODE_FIELD_NUMBER: _ClassVar[int]
    ERROR_MESSAGE_FIELD_NUMBER: _ClassVar[int]
    START_TIME_FIELD_NUMBER: _ClassVar[int]
    END_TIME_FIELD_NUMBER: _ClassVar[int]
    id: str
    state: NodeState
    kind: TaskKind
    depends_on: _containers.RepeatedScalarFieldContainer[str]
    attempt: int
    runs: int
    output: str
    fields: _containers.ScalarMap[str, str]
    usage: _generation_pb2.Usage
    cost: _money_pb2.Money
    error_code: str
    error_message: str
    start_time: _timestamp_pb2.Timestamp
    end_time: _timestamp_pb2.Timestamp
    def __init__(self, id: _Optional[str] = ..., state: _Optional[_Union[NodeState, str]] = ..., kind: _Optional[_Union[TaskKind, str]] = ..., depends_on: _Optional[_Iterable[str]] = ..., attempt: _Optional[int] = ..., runs: _Optional[int] = ..., output: _Optional[str] = ..., fields: _Optional[_Mapping[str, str]] = ..., usage: _Optional[_Union[_generation_pb2.Usage, _Mapping]] = ..., cost: _Optional[_Union[_money_pb2.Money, _Mapping]] = ..., error_code: _Optional[str] = ..., error_message: _Optional[str] = ..., start_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., end_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class Workflow(_message.Message):
    __slots__ = ("workflow_id", "name", "state", "traffic_class", "create_time", "deadline", "end_time", "tags", "max_concurrency", "nodes", "usage", "cost", "mermaid")
    class TagsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    WORKFLOW_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    TRAFFIC_CLASS_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_FIELD_NUMBER: _ClassVar[int]
    END_TIME_FIELD_NUMBER: _ClassVar[int]
    TAGS_FIELD_NUMBER: _ClassVar[int]
    MAX_CONCURRENCY_FIELD_NUMBER: _ClassVar[int]
    NODES_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    COST_FIELD_NUMBER: _ClassVar[int]
    MERMAID_FIELD_NUMBER: _ClassVar[int]
    workflow_id: str
    name: str
    state: WorkflowState
    traffic_class: _generation_pb2.TrafficClass
    create_time: _timestamp_pb2.Timestamp
    deadline: _timestamp_pb2.Timestamp
    end_time: _timestamp_pb2.Timestamp
    tags: _containers.ScalarMap[str, str]
    max_concurrency: int
    nodes: _containers.RepeatedCompositeFieldContainer[NodeStatus]
    usage: _generation_pb2.Usage
    cost: _money_pb2.Money
    mermaid: str
    def __init__(self, workflow_id: _Optional[str] = ..., name: _Optional[str] = ..., state: _Optional[_Union[WorkflowState, str]] = ..., traffic_class: _Optional[_Union[_generation_pb2.TrafficClass, str]] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., deadline: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., end_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., tags: _Optional[_Mapping[str, str]] = ..., max_concurrency: _Optional[int] = ..., nodes: _Optional[_Iterable[_Union[NodeStatus, _Mapping]]] = ..., usage: _Optional[_Union[_generation_pb2.Usage, _Mapping]] = ..., cost: _Optional[_Union[_money_pb2.Money, _Mapping]] = ..., mermaid: _Optional[str] = ...) -> None: ...

class GetWorkflowRequest(_message.Message):
    __slots__ = ("workflow_id",)
    WORKFLOW_ID_FIELD_NUMBER: _ClassVar[int]
    workflow_id: str
    def __init__(self, workflow_id: _Optional[str] = ...) -> None: ...

class GetWorkflowResponse(_message.Message):
    __slots__ = ("workflow",)
    WORKFLOW_FIELD_NUMBER: _ClassVar[int]
    workflow: Workflow
    def __init__(self, workflow: _Optional[_Union[Workflow, _Mapping]] = ...) -> None: ...

class ListWorkflowsRequest(_message.Message):
    __slots__ = ("page_size", "page_token", "state")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    state: WorkflowState
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ..., state: _Optional[_Union[WorkflowState, str]] = ...) -> None: ...

class ListWorkflowsResponse(_message.Message):
    __slots__ = ("workflows", "next_page_token")
    WORKFLOWS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    workflows: _containers.RepeatedCompositeFieldContainer[Workflow]
    next_page_token: str
    def __init__(self, workflows: _Optional[_Iterable[_Union[Workflow, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class CancelWorkflowRequest(_message.Message):
    __slots__ = ("workflow_id",)
    WORKFLOW_ID_FIELD_NUMBER: _ClassVar[int]
    workflow_id: str
    def __init__(self, workflow_id: _Optional[str] = ...) -> None: ...

class CancelWorkflowResponse(_message.Message):
    __slots__ = ("workflow",)
    WORKFLOW_FIELD_NUMBER: _ClassVar[int]
    workflow: Workflow
    def __init__(self, workflow: _Optional[_Union[Workflow, _Mapping]] = ...) -> None: ...

class WatchWorkflowRequest(_message.Message):
    __slots__ = ("workflow_id",)
    WORKFLOW_ID_FIELD_NUMBER: _ClassVar[int]
    workflow_id: str
    def __init__(self, workflow_id: _Optional[str] = ...) -> None: ...

class WatchWorkflowResponse(_message.Message):
    __slots__ = ("node", "workflow_state", "usage", "cost")
    NODE_FIELD_NUMBER: _ClassVar[int]
    WORKFLOW_STATE_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    COST_FIELD_NUMBER: _ClassVar[int]
    node: NodeStatus
    workflow_state: WorkflowState
    usage: _generation_pb2.Usage
    cost: _money_pb2.Money
    def __init__(self, node: _Optional[_Union[NodeStatus, _Mapping]] = ..., workflow_state: _Optional[_Union[WorkflowState, str]] = ..., usage: _Optional[_Union[_generation_pb2.Usage, _Mapping]] = ..., cost: _Optional[_Union[_money_pb2.Money, _Mapping]] = ...) -> None: ...
