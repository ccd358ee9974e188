"""The service serves the INT8 or the INT4 build, chosen by `precision` (flag or mesh file); both
builds live side by side in the model cache and GetModelInfo names the one served."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import yaml

from autoglm.inference.v1 import inference_service_pb2 as pb2
from autoglm.inference.v1 import inference_service_pb2_grpc as pb2_grpc
from services.inference.engine.engine import min_decode_rows
from services.inference.engine.kv_cache import SlotBatch
from services.inference.engine.model import find_default_model, load_model
from services.inference.engine.session import SessionSettings
from services.inference.modelbuild.build import build
from services.inference.modelbuild.manifest import MANIFEST_NAME, load_manifest
from tests.conftest import ROOT
from tests.integration.inference.helpers import generate, request
from tests.integration.router.service_process import drain, start_service, stop


@pytest.fixture(scope="module")
def int4_dir() -> Path:
    return build(None, precision="int4").path  # reused from the cache after the first build


@pytest.fixture(scope="module")
def int8_dir() -> Path:
    return build(None).path


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    stop(started)


def test_both_builds_coexist_and_the_default_stays_int8(tmp_path: Path, int8_dir: Path, int4_dir: Path) -> None:
    assert int8_dir != int4_dir and int8_dir.parent == int4_dir.parent
    assert load_manifest(int8_dir).precision == "int8" and load_manifest(int4_dir).precision == "int4"
    # a copy of both manifests, the INT4 one written last (the newest build)
    root = tmp_path / "cache"
    for source in (int8_dir, int4_dir):
        target = root / source.parent.name / source.name
        target.mkdir(parents=True)
        shutil.copy(source / MANIFEST_NAME, target / MANIFEST_NAME)
    assert find_default_model(root) == root / int8_dir.parent.name / int8_dir.name
    assert find_default_model(root, "int4") == root / int4_dir.parent.name / int4_dir.name


async def test_mesh_file_precision_int4_serves_the_int4_build(tmp_path: Path, int4_dir: Path, processes) -> None:
    mesh = tmp_path / "mesh.yaml"
    mesh.write_text(yaml.safe_dump({"inference": {"precision": "int4", "intra_op_threads": 2}}))
    proc, address = start_service("inference", ["--config", str(mesh), "--replica-id", "int4"], processes)
    drain(proc)
    manifest = load_manifest(int4_dir)
    async with grpc.aio.insecure_channel(address) as chan:
        stub = pb2_grpc.InferenceServiceStub(chan)
        info = await stub.GetModelInfo(pb2.GetModelInfoRequest(), timeout=30)
        assert info.precision == pb2.PRECISION_INT4
        assert info.version == manifest.version and info.version.startswith("int4-")
        result = await generate(stub, request("The capital of France is", max_tokens=8))
        assert "Paris" in result.text


async def test_precision_flag_int8_serves_the_int8_build(int8_dir: Path, int4_dir: Path, processes) -> None:
    proc, address = start_service("inference", ["--precision", "int8", "--threads", "2"], processes)
    drain(proc)
    async with grpc.aio.insecure_channel(address) as chan:
        info = await pb2_grpc.InferenceServiceStub(chan).GetModelInfo(pb2.GetModelInfoRequest(), timeout=30)
    assert info.precision == pb2.PRECISION_INT8 and info.version == load_manifest(int8_dir).version


def test_model_dir_of_another_precision_refuses_to_start(int4_dir: Path) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "gen")])}
    done = subprocess.run([sys.executable, "-m", "services.inference", "--port", "0", "--model-dir", str(int4_dir),
                           "--precision", "int8"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "is an int4 build, but precision int8 was asked for" in done.stderr
    assert "Traceback" not in done.stderr


def test_no_int4_build_says_how_to_make_one(tmp_path: Path, int8_dir: Path) -> None:
    root = tmp_path / "cache"
    target = root / int8_dir.parent.name / int8_dir.name
    target.mkdir(parents=True)
    shutil.copy(int8_dir / MANIFEST_NAME, target / MANIFEST_NAME)
    env = {**os.environ, "AUTOGLM_MODEL_CACHE": str(root),
           "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "gen")])}
    done = subprocess.run([sys.executable, "-m", "services.inference", "--port", "0", "--precision", "int4"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "no built model found" in done.stderr and "autoglm model build --precision int4" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("precision", ["int8", "int4"])
async def test_a_row_decodes_the_same_bits_alone_as_beside_another(precision: str, int8_dir: Path,
                                                                   int4_dir: Path) -> None:
    """The engine's decode batches (its SlotBatch with the build's min_decode_rows): a sequence decoded
    alone writes the same KV bits, step after step, as beside another sequence, for either build (the
    INT4 build's one-row matmuls take other kernels on some CPUs, so it never decodes one row alone)."""
    model = load_model(int4_dir if precision == "int4" else int8_dir, SessionSettings(intra_op_threads=2))
    prompt = model.encode("Tell me about the rivers of the north and how they change over the seasons.")

    def decode(company: bool) -> np.ndarray:
        batch = SlotBatch(model.spec, 4, 256, min_rows=min_decode_rows(model.manifest.precision))
        slots = [batch.take(i) for i in range(2 if company else 1)]
        for n, slot in enumerate(slots):
            ids = prompt if n == 0 else prompt[:9]
            mask = np.zeros((1, batch.width), dtype=np.int64)
            mask[0, : len(ids)] = 1
            model.runner.prefill(np.array([ids], dtype=np.int64), mask, batch.slot_view(slot))
            batch.prefilled(slot, len(ids), True)
        binding = model.runner.decode_binding(batch.step_view())
        token = 42
        for _ in range(12):
            step = np.full((batch.bound, 1), 7, dtype=np.int64)
            step[0, 0] = token
            logits = binding.run(step, batch.step_mask())
            batch.advance()
            token = int(logits[0].argmax())
        return batch.read_columns(slots[0], 0, len(prompt) + 12)

    assert np.array_equal(decode(company=False), decode(company=True))
