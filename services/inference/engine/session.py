"""ONNX Runtime session factory and the model runner the scheduler calls once per step.

CUDAExecutionProvider (with IOBinding; the KV-cache lives on the device) is used when this
onnxruntime build offers it, CPUExecutionProvider otherwise.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from services.common.errors import FailedPrecondition
from services.inference.engine.kv_cache import SlotView

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
PROVIDER_CHOICES = ("auto", "cuda", "cpu")


def choose_provider(preference: str, available: Sequence[str]) -> str:
    """`auto`: CUDA when available, else CPU. `cuda` insists (and fails clearly without a GPU)."""
    if preference not in PROVIDER_CHOICES:
        raise ValueError(f"provider must be one of {', '.join(PROVIDER_CHOICES)}, got {preference!r}")
    if preference == "cpu":
        return CPU
    if CUDA in available:
        return CUDA
    if preference == "cuda":
        raise FailedPrecondition(
            f"provider 'cuda' was asked for but this onnxruntime build offers only {', '.join(available)}; "
            "install onnxruntime-gpu on a machine with a GPU, or use provider 'auto'")
    return CPU


def default_threads() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


@dataclass(frozen=True)
class SessionSettings:
    provider: str = "auto"
    intra_op_threads: int = 0  # 0 = one per available core
    # Worker threads busy-wait for work between kernels: +40 % batch-1 decode through gRPC on 2
    # cores (measured; waking sleeping workers for each of ~350 small kernels costs more than the
    # cycles spinning takes from the event loop). Off for a replica that shares its cores.
    allow_spinning: bool = True


def create_session(model_path: Path, settings: SessionSettings) -> tuple[ort.InferenceSession, str]:
    provider = choose_provider(settings.provider, ort.get_available_providers())
    options = ort.SessionOptions()
    options.intra_op_num_threads = settings.intra_op_threads or default_threads()
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if settings.allow_spinning else "0")
    providers: list[str] = [CUDA, CPU] if provider == CUDA else [CPU]
    session = ort.InferenceSession(str(model_path), options, providers=providers)
    return session, session.get_providers()[0]


@dataclass(frozen=True)
class ModelIO:
    """Names of the graph's inputs and outputs, checked against the session itself."""

    input_ids: str
    attention_mask: str
    logits: str
    past: tuple[str, ...]
    present: tuple[str, ...]

    @classmethod
    def from_session(cls, session: ort.InferenceSession, past_names: Sequence[str],
                     present_names: Sequence[str]) -> ModelIO:
        inputs = {i.name for i in session.get_inputs()}
        outputs = [o.name for o in session.get_outputs()]
        missing = [n for n in ("input_ids", "attention_mask", *past_names) if n not in inputs]
        missing += [n for n in present_names if n not in outputs]
        if missing:
            raise FailedPrecondition(f"the model graph lacks the inputs/outputs {', '.join(missing)} "
                                     "its manifest names; rebuild it with `make model`")
        logits = next(n for n in outputs if n not in set(present_names))
        return cls("input_ids", "attention_mask", logits, tuple(past_names), tuple(present_names))


class ModelRunner:
    """Forward passes over the cache in place: the slots a call works on are bound as past AND
    present (GroupQueryAttention's shared buffer), so the call writes its new columns into them."""

    def __init__(self, session: ort.InferenceSession, io: ModelIO, provider: str) -> None:
        self.session = session
        self.io = io
        self.provider = provider
        self.device = "cuda" if provider == CUDA else "cpu"
        self.vocab_size = _vocab_size(session, io.logits)

    def prefill(self, input_ids: np.ndarray, attention_mask: np.ndarray, view: SlotView,
                guard: CallGuard | None = None) -> np.ndarray:
        """One prompt chunk of one sequence written into its slot; the logits of its last token [1, vocab].
        Interrupted when `guard` is stopped before the call ends (the slot's columns it wrote are garbage)."""
        binding = self.session.io_binding()
        binding.bind_cpu_input(self.io.input_ids, input_ids)
        binding.bind_cpu_input(self.io.attention_mask, attention_mask)
        bind_cache(binding, self.io, view)
        binding.bind_output(self.io.logits, "cpu")
        try:
            self.session.run_with_iobinding(binding, guard.options if guard is not None else None)
        except RuntimeError as error:
            if guard is not None and guard.stopped:
                raise Interrupted("the model call was stopped") from error
            raise
        logits = binding.get_outputs()[-1].numpy()
        return logits.reshape(logits.shape[0], -1)

    def decode_binding(self, view: SlotView) -> DecodeBinding:
        """An IOBinding for the decode rows of `view`, reused step after step until they change."""
        return DecodeBinding(self, view)


class Interrupted(Exception):
    """A model call stopped through its guard before it ended."""


class CallGuard:
    """Lets another thread stop one model call: ONNX Runtime checks `terminate` between the graph's
    nodes, so the call ends within one node's time (a stop set before the call starts ends it at once)."""

    def __init__(self) -> None:
        self.options = ort.RunOptions()
        self.stopped = False

    def stop(self) -> None:
        self.stopped = True
        self.options.terminate = True


def bind_cache(binding: ort.IOBinding, io: ModelIO, view: SlotView) -> None:
    for past, present, pointer in zip(io.past, io.present, view.pointers, strict=True):
        binding.bind_input(past, view.device, 0, view.dtype, list(view.shape), pointer)
        binding.bind_output(present, view.device, 0, view.dtype, list(view.shape), pointer)


class DecodeBinding:
    """The cache is bound once as past AND present (the step writes its new column in place); the
    logits go into one preallocated host buffer; each step only rebinds input ids and the mask."""

    def __init__(self, runner: ModelRunner, view: SlotView) -> None:
        io = runner.io
        rows = view.shape[0]
        self._runner = runner
        self._binding = runner.session.io_binding()
        bind_cache(self._binding, io, view)
        self._logits: np.ndarray | None = None
        if runner.device == "cpu" and runner.vocab_size is not None:
            self._logits = np.empty((rows, 1, runner.vocab_size), dtype=np.float32)
            self._binding.bind_ortvalue_output(io.logits, ort.OrtValue.ortvalue_from_numpy(self._logits))
        else:
            self._binding.bind_output(io.logits, "cpu")

    def run(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        """One decode step: logits [rows, vocab], valid until the next step of this binding."""
        io = self._runner.io
        self._binding.bind_cpu_input(io.input_ids, input_ids)
        self._binding.bind_cpu_input(io.attention_mask, attention_mask)
        self._runner.session.run_with_iobinding(self._binding)
        logits = self._logits if self._logits is not None else self._binding.get_outputs()[-1].numpy()
        return logits.reshape(logits.shape[0], -1)


def _vocab_size(session: ort.InferenceSession, logits: str) -> int | None:
    shape = next(o.shape for o in session.get_outputs() if o.name == logits)
    return shape[-1] if shape and isinstance(shape[-1], int) else None
