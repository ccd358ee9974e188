"""The model cache: <root>/<name>/<version>/, written via a temp dir and an atomic rename."""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import structlog

from services.inference.modelbuild.errors import ManifestError
from services.inference.modelbuild.manifest import Manifest, load_manifest

log = structlog.get_logger(__name__)

CACHE_ENV = "AUTOGLM_MODEL_CACHE"
DOWNLOADS = ".downloads"


def cache_root(cache_dir: Path | None = None, environ: dict[str, str] | None = None) -> Path:
    """--cache-dir, else $AUTOGLM_MODEL_CACHE, else ~/.cache/autoglm/models."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ if environ is None else environ
    if env.get(CACHE_ENV):
        return Path(env[CACHE_ENV]).expanduser()
    return Path.home() / ".cache" / "autoglm" / "models"


def model_dir(root: Path, name: str, version: str) -> Path:
    return root / name / version


def downloads_dir(root: Path) -> Path:
    return root / DOWNLOADS


def valid_manifest(directory: Path) -> Manifest | None:
    """The manifest of a complete, unmodified build in `directory`, else None (with the reason logged)."""
    if not directory.is_dir():
        return None
    try:
        manifest = load_manifest(directory)
        manifest.verify(directory)
    except ManifestError as err:
        log.warning("cache.invalid", path=str(directory), reason=str(err))
        return None
    return manifest


@contextmanager
def staging(final: Path) -> Iterator[Path]:
    """A temp dir beside `final`; removed on failure. Publish it with `publish`."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.build-", dir=final.parent))
    try:
        yield tmp
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def publish(staged: Path, final: Path) -> None:
    """Atomically move a finished build into place, replacing any previous one."""
    if final.exists():
        retired = final.with_name(f".{final.name}.old-{uuid.uuid4().hex[:8]}")
        final.rename(retired)
        shutil.rmtree(retired, ignore_errors=True)
    staged.rename(final)
