"""`python -m services.inference` fails fast, with the fix in the message, when no model is built."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT


def test_main_without_a_built_model_says_to_run_make_model(tmp_path: Path) -> None:
    env = {**os.environ, "AUTOGLM_MODEL_CACHE": str(tmp_path / "empty-cache")}
    done = subprocess.run([sys.executable, "-m", "services.inference", "--port", "0", "--replica-id", "r1"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "no built model found" in done.stderr and "make model" in done.stderr
    assert "Traceback" not in done.stderr
