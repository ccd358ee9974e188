"""Generate Python, gRPC and .pyi stubs from protos/ into gen/.

`python scripts/genproto.py` regenerates gen/; `--check` regenerates into a temporary
directory and fails (exit 1) when gen/ differs, listing the files that drift.
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc  # type: ignore[import-untyped]

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"
GEN = ROOT / "gen"


def generate(out: Path) -> None:
    (out / "autoglm").mkdir(parents=True, exist_ok=True)
    files = sorted(str(p.relative_to(PROTOS)) for p in PROTOS.rglob("*.proto"))
    include = Path(protoc.__file__).parent / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{PROTOS}",
        f"-I{include}",
        f"--python_out={out}",
        f"--grpc_python_out={out}",
        f"--pyi_out={out}",
        f"--descriptor_set_out={out / 'autoglm' / 'descriptor_set.binpb'}",
        "--include_source_info",
        "--include_imports",
        *files,
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    for directory in [p for p in out.rglob("*") if p.is_dir()]:
        (directory / "__init__.py").touch()
    (out / "autoglm" / "py.typed").touch()


def tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and "__pycache__" not in p.parts}


def check() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        fresh = Path(tmp) / "gen"
        generate(fresh)
        want, have = tree(fresh), tree(GEN) if GEN.exists() else set()
        drift = sorted(want ^ have)
        drift += sorted(f for f in want & have if not filecmp.cmp(fresh / f, GEN / f, shallow=False))
    if drift:
        print("gen/ is out of date with protos/ (run `make gen`):", *drift, sep="\n  ", file=sys.stderr)
        return 1
    print("gen/ matches protos/")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if gen/ differs from a fresh generation")
    if parser.parse_args().check:
        return check()
    if GEN.exists():
        shutil.rmtree(GEN)
    generate(GEN)
    print(f"generated {len(tree(GEN))} files into {GEN.relative_to(ROOT)}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
