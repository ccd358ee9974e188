"""`python -m bench.http.llama_server ARGS`: llama.cpp's OpenAI server, exactly `python -m llama_cpp.server
ARGS`, with the weights in llama.cpp's plain CPU buffers (no AMX or repacked layouts).

llama.cpp built for this CPU may pick its AMX buffer type, which dies with a signal on some machines (seen on
a 2-core Sapphire Rapids guest, on the first token; bench/inference meets the same): the benchmark starts the
plain server first and falls back to this one only when that happens, and says so in its settings.
"""

from __future__ import annotations

from typing import Any

import llama_cpp.llama_cpp as native

_defaults = native.llama_model_default_params


def _without_extra_buffers() -> Any:
    params = _defaults()
    params.use_extra_bufts = False
    return params


native.llama_model_default_params = _without_extra_buffers  # type: ignore[assignment]

if __name__ == "__main__":
    from llama_cpp.server.__main__ import main

    main()
