"""Builds the bundled chat model (or a local Llama-family checkpoint) into a cached INT8 (or INT4)
ONNX causal LM with a KV-cache, described by manifest.json.

Importing this package needs neither torch nor transformers: those load inside the build.
"""

from services.inference.modelbuild.errors import ManifestError, ModelBuildError
from services.inference.modelbuild.manifest import Manifest, load_manifest

__all__ = ["Manifest", "ManifestError", "ModelBuildError", "build_model", "load_manifest"]


def build_model(source: str | None = None, cache_dir=None, force: bool = False,  # type: ignore[no-untyped-def]
                precision: str = "int8"):
    """See services.inference.modelbuild.build.build_model."""
    from services.inference.modelbuild.build import build_model as _build_model

    return _build_model(source, cache_dir, force, precision=precision)
