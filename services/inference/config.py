"""Inference settings: read once at the edge (flags and the `inference:` section of the mesh file)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from services.common.config import ServerSettings
from services.inference.engine.scheduler import SchedulerSettings
from services.inference.engine.session import PROVIDER_CHOICES, SessionSettings

DEFAULT_PORT = 50071
SERVED_PRECISIONS = ("int8", "int4")
# Keys of the mesh file's `inference:` section that belong to the launcher, not to one replica.
LAUNCHER_KEYS = frozenset({"port", "replicas", "host", "metrics_port", "engine_metering"})


@dataclass(frozen=True)
class InferenceConfig:
    server: ServerSettings = field(default_factory=lambda: ServerSettings(port=DEFAULT_PORT))
    replica_id: str = "inference-0"
    # A built model (manifest.json inside); None = the most recent build of `precision` in the model cache.
    model_dir: Path | None = None
    # Which build to serve: int8 | int4 (`autoglm model build --precision int4`). With model_dir set, the
    # build there must be of this precision when one is given; None = int8 from the cache, or what model_dir holds.
    precision: str | None = None
    max_batch_size: int = 16
    max_batched_tokens: int = 256
    prefill_chunk: int = 128
    queue_capacity: int = 128
    decode_rows: int = 16
    # KV cache (bytes) the admitted sequences may reserve (prompt + max_tokens each); 0 = a full batch
    # of full-context sequences, capped at a quarter of the machine's (or cgroup's) memory.
    kv_budget_bytes: int = 0
    # Prompt KV kept across requests (conversation turns, shared system prompts, retries), in blocks of
    # prefix_block_tokens, at most prefix_cache_bytes and always inside kv_budget_bytes.
    prefix_cache: bool = True
    prefix_cache_bytes: int = 256 * 1024 * 1024
    prefix_block_tokens: int = 8
    # A prompt (or a conversation's history) caches at most its first N tokens: long one-off documents
    # would otherwise evict many short shared prefixes and double their own KV memory while they run.
    prefix_cache_max_prompt_tokens: int = 2048
    # While at most this many sequences decode and none waits, the answer of a conversation's later turn
    # (an assistant message in its prompt) is prefilled into a second KV slot as it is decoded, so a next
    # turn sent at once finds it cached (0 = answers are prefilled only while the replica idles).
    eager_warm_rows: int = 2
    intra_op_threads: int = 0  # 0 = one per core
    # ONNX Runtime worker threads busy-wait between kernels (faster small steps, burns idle CPU).
    allow_spinning: bool = True
    provider: str = "auto"  # auto | cuda | cpu
    verify_model: bool = False  # re-hash the model files at start
    # Engine-side metering (services/inference/usage_reporter.py): with a billing address (`--billing`;
    # `autoglm up` gives the replica's sidecar's outbound listener), every finished sequence is reported to
    # billing in batches of `usage_batch` (or what `usage_flush_s` gathered), off the decode path; at most
    # `usage_buffer` records wait while billing is unreachable (then the oldest are dropped, counted).
    billing: str = ""
    usage_buffer: int = 100_000
    usage_batch: int = 500
    usage_flush_s: float = 0.5

    def __post_init__(self) -> None:
        if self.provider not in PROVIDER_CHOICES:
            raise ValueError(f"provider must be one of {', '.join(PROVIDER_CHOICES)}, got {self.provider!r}")
        if self.precision is not None and self.precision not in SERVED_PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(SERVED_PRECISIONS)}, got {self.precision!r}")
        if self.intra_op_threads < 0:
            raise ValueError(f"intra_op_threads must be >= 0, got {self.intra_op_threads}")
        if self.usage_buffer < 1 or not 1 <= self.usage_batch <= 1000 or self.usage_flush_s < 0:
            raise ValueError("usage_buffer must be >= 1, usage_batch 1 to 1000 and usage_flush_s >= 0")
        self.scheduler  # noqa: B018 - validates the scheduler fields

    @property
    def scheduler(self) -> SchedulerSettings:
        return SchedulerSettings(max_batch_size=self.max_batch_size, max_batched_tokens=self.max_batched_tokens,
                                 prefill_chunk=self.prefill_chunk, queue_capacity=self.queue_capacity,
                                 decode_rows=self.decode_rows, kv_budget_bytes=self.kv_budget_bytes,
                                 prefix_cache=self.prefix_cache, prefix_cache_bytes=self.prefix_cache_bytes,
                                 prefix_block_tokens=self.prefix_block_tokens,
                                 prefix_cache_max_prompt_tokens=self.prefix_cache_max_prompt_tokens,
                                 eager_warm_rows=self.eager_warm_rows)

    @property
    def session(self) -> SessionSettings:
        return SessionSettings(provider=self.provider, intra_op_threads=self.intra_op_threads,
                               allow_spinning=self.allow_spinning)


def replica_overrides(section: dict[str, Any]) -> dict[str, Any]:
    """The engine settings of a mesh file's `inference:` section (launcher keys dropped)."""
    values = {k: v for k, v in section.items() if k not in LAUNCHER_KEYS}
    if "model_dir" in values and values["model_dir"] is not None:
        values["model_dir"] = Path(values["model_dir"]).expanduser()
    return values
