"""The one cost formula of the mesh, in integer micro-units (billing charges with it; the router quotes
with it, so the cost in a stream's last message is exactly what billing records).

The exact cost is (prompt x input_price + completion x output_price) / 1,000,000 micro-units (prices are
per million tokens), rounded ONCE on that total, half up. Cached usage is priced at the cached price for
both kinds of tokens when the model has one. No float is ever involved.
"""

from __future__ import annotations

MILLION = 1_000_000


def usage_cost_micros(prompt_tokens: int, completion_tokens: int, input_per_million: int, output_per_million: int,
                      cached_per_million: int | None = None, cached: bool = False) -> int:
    if cached and cached_per_million is not None:
        numerator = (prompt_tokens + completion_tokens) * cached_per_million
    else:
        numerator = prompt_tokens * input_per_million + completion_tokens * output_per_million
    return (numerator + MILLION // 2) // MILLION
