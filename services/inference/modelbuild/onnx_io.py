"""Saving ONNX models with their weights in one external data file."""

from __future__ import annotations

from pathlib import Path

import onnx


def external_data_name(model_path: Path) -> str:
    return model_path.name + ".data"


def save_onnx(model: onnx.ModelProto, path: Path) -> Path:
    """Write `path` plus `path.data`; replaces both if present."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = path.parent / external_data_name(path)
    for stale in (path, data):
        stale.unlink(missing_ok=True)
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=data.name, size_threshold=1024)
    return path


def model_files(path: Path) -> list[Path]:
    """The .onnx file and its external data file, if it has one."""
    data = path.parent / external_data_name(path)
    return [path, data] if data.exists() else [path]
