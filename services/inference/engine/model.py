"""A built model loaded for serving: manifest, ONNX session, tokenizer, chat template, defaults.

Loading is the slow part (seconds); one LoadedModel can back several engines (tests share it).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from services.common.errors import FailedPrecondition
from services.inference.chat_template import ChatTemplate
from services.inference.engine.kv_cache import KvSpec
from services.inference.engine.session import ModelIO, ModelRunner, SessionSettings, create_session
from services.inference.engine.validation import ModelDefaults
from services.inference.modelbuild.cache import cache_root
from services.inference.modelbuild.errors import ManifestError
from services.inference.modelbuild.hashing import sha256_file
from services.inference.modelbuild.manifest import MANIFEST_NAME, Manifest, load_manifest

NO_BOUND = 1 << 40
BUILD_HINT = "run `make model` to build the bundled model, or pass --model-dir DIR of a built model"
DEFAULT_PRECISION = "int8"


def find_default_model(root: Path | None = None, precision: str = DEFAULT_PRECISION) -> Path:
    """The most recently built model of `precision` under the cache root (~/.cache/autoglm/models)."""
    base = cache_root(root)
    manifests = sorted(base.glob(f"*/*/{MANIFEST_NAME}"), key=lambda p: p.stat().st_mtime, reverse=True)
    for path in manifests:
        try:
            if load_manifest(path.parent).precision == precision:
                return path.parent
        except ManifestError:
            continue
    hint = BUILD_HINT if precision == DEFAULT_PRECISION else \
        f"run `autoglm model build --precision {precision}`, or pass --model-dir DIR of a built model"
    raise FailedPrecondition(f"no built model found under {base} (precision {precision}); {hint}")


@dataclass
class LoadedModel:
    directory: Path
    manifest: Manifest
    manifest_sha256: str
    runner: ModelRunner
    tokenizer: Tokenizer
    template: ChatTemplate
    defaults: ModelDefaults
    spec: KvSpec
    max_token_bytes: int = 1  # the longest token's text in UTF-8 bytes (a bound for length checks)

    @property
    def provider(self) -> str:
        return self.runner.provider

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=False)

    def encode(self, text: str) -> list[int]:
        # encode_batch releases the GIL (encode does not), so a long text on a worker thread does
        # not stall the event loop
        return list(self.tokenizer.encode_batch([text], add_special_tokens=False)[0].ids)


def load_model(directory: Path | None, session: SessionSettings, verify: bool = False,
               precision: str | None = None) -> LoadedModel:
    """Load `directory`, else the latest build of `precision` (default int8) in the model cache."""
    directory = directory if directory is not None else find_default_model(precision=precision or DEFAULT_PRECISION)
    try:
        manifest = load_manifest(directory)
        if verify:
            manifest.verify(directory)
    except ManifestError as err:
        raise FailedPrecondition(f"cannot load the model in {directory}: {err}; {BUILD_HINT}") from err
    if precision is not None and manifest.precision != precision:
        raise FailedPrecondition(f"the model in {directory} is an {manifest.precision} build, but precision "
                                 f"{precision} was asked for; pass that build's directory or leave precision unset")
    ort_session, provider = create_session(directory / manifest.model_file, session)
    io = ModelIO.from_session(ort_session, manifest.kv.past_names(), manifest.kv.present_names())
    tokenizer = Tokenizer.from_file(str(directory / manifest.tokenizer_file))
    # vocabulary strings are never shorter in UTF-8 than the bytes they stand for (byte-level and
    # sentencepiece alphabets map one byte to one or more), so this bounds a token's text; a
    # normalizer could shrink the text first, and then no bound is claimed
    max_token_bytes = max(len(token.encode()) for token in tokenizer.get_vocab(with_added_tokens=True))
    if tokenizer.normalizer is not None:
        max_token_bytes = NO_BOUND
    return LoadedModel(
        directory=directory,
        manifest=manifest,
        manifest_sha256=sha256_file(directory / MANIFEST_NAME),
        runner=ModelRunner(ort_session, io, provider),
        tokenizer=tokenizer,
        template=ChatTemplate.for_model(manifest, tokenizer),
        defaults=_defaults(directory / manifest.generation_config_file),
        spec=KvSpec(tensors=len(io.past), kv_heads=manifest.kv.num_kv_heads, head_dim=manifest.kv.head_dim,
                    dtype=np.dtype(manifest.kv.dtype)),
        max_token_bytes=max(1, max_token_bytes),
    )


def _defaults(path: Path) -> ModelDefaults:
    if not path.is_file():
        return ModelDefaults()
    config = json.loads(path.read_text(encoding="utf-8"))
    return ModelDefaults(
        temperature=float(config.get("temperature") or 1.0),
        top_p=float(config.get("top_p") or 1.0),
        top_k=int(config.get("top_k") or 0),
        max_new_tokens=int(config.get("max_new_tokens") or 256),
    )
