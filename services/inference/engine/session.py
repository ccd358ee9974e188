"""ONNX Runtime session factory and the model runner the scheduler calls once per step.

CUDAExecutionProvider (with IOBinding; the batch KV-cache stays on the device between steps) is
used when this onnxruntime build offers it, CPUExecutionProvider otherwise.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from services.common.errors import FailedPrecondition

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


def create_session(model_path: Path, settings: SessionSettings) -> tuple[ort.InferenceSession, str]:
    provider = choose_provider(settings.provider, ort.get_available_providers())
    options = ort.SessionOptions()
    options.intra_op_num_threads = settings.intra_op_threads or default_threads()
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.add_session_config_entry("session.intra_op.allow_spinning", "1")
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
    """Forward passes: `prefill` over numpy arrays (the cache grows into new arrays) and `decode`
    over a shared past/present buffer that the step updates in place."""

    def __init__(self, session: ort.InferenceSession, io: ModelIO, provider: str) -> None:
        self.session = session
        self.io = io
        self.provider = provider
        self.device = "cuda" if provider == CUDA else "cpu"
        self._outputs = [io.logits, *io.present]

    def prefill(self, input_ids: np.ndarray, attention_mask: np.ndarray,
                past: Sequence[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        """Logits of each row's last real token [batch, vocab] and the grown cache (host arrays)."""
        if self.device == "cpu":
            feed = {self.io.input_ids: input_ids, self.io.attention_mask: attention_mask}
            feed.update(zip(self.io.past, past, strict=True))
            logits, *presents = self.session.run(self._outputs, feed)
            return logits.reshape(logits.shape[0], -1), presents
        binding = self.session.io_binding()
        binding.bind_cpu_input(self.io.input_ids, input_ids)
        binding.bind_cpu_input(self.io.attention_mask, attention_mask)
        for name, array in zip(self.io.past, past, strict=True):
            binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(array, self.device, 0))
        for name in self._outputs:
            binding.bind_output(name, self.device, 0)
        self.session.run_with_iobinding(binding)
        logits, *presents = binding.copy_outputs_to_cpu()
        return logits.reshape(logits.shape[0], -1), presents

    def decode(self, input_ids: np.ndarray, attention_mask: np.ndarray,
               cache: Sequence[ort.OrtValue]) -> np.ndarray:
        """One decode step; `cache` (host or device OrtValues) is bound as past AND present."""
        binding = self.session.io_binding()
        binding.bind_cpu_input(self.io.input_ids, input_ids)
        binding.bind_cpu_input(self.io.attention_mask, attention_mask)
        for past, present, value in zip(self.io.past, self.io.present, cache, strict=True):
            binding.bind_ortvalue_input(past, value)
            binding.bind_ortvalue_output(present, value)
        binding.bind_output(self.io.logits, "cpu")
        self.session.run_with_iobinding(binding)
        logits = binding.get_outputs()[-1].numpy()
        return logits.reshape(logits.shape[0], -1)
