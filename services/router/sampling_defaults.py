"""Default sampling of a model version: what a request gets for the sampling fields it leaves unset.

A version carries defaults for temperature, top_p, top_k and repetition_penalty (`autoglm up` seeds the
bundled model with its card's recommendation, `mesh.seed_sampling`; an operator sets them with
RegisterModelVersion). The gateway applies them once it has picked the version, so gRPC, the HTTP API,
tasks and batch items agree. An explicit temperature 0 is plain greedy decoding and takes no default
(no penalty either): a greedy answer stays the model's most likely text. Ranges are the engine's.
"""

from __future__ import annotations

from dataclasses import replace

from services.common.errors import InvalidInput
from services.common.generation import Sampling

# The fields a version may default; seed, stop and max_tokens belong to each request.
DEFAULTABLE = ("temperature", "top_p", "top_k", "repetition_penalty")
FIELD = "default_sampling"


def check_defaults(defaults: Sampling) -> Sampling:
    """The defaults as given, or InvalidInput naming the field out of range (or not defaultable)."""
    for name in ("seed", "max_tokens"):
        if getattr(defaults, name) is not None:
            raise InvalidInput(f"{FIELD}.{name} cannot have a default; set it per request "
                               f"(a version may default {', '.join(DEFAULTABLE)})", field=f"{FIELD}.{name}")
    if defaults.stop:
        raise InvalidInput(f"{FIELD}.stop cannot have a default; set it per request", field=f"{FIELD}.stop")
    t, p, k, penalty = defaults.temperature, defaults.top_p, defaults.top_k, defaults.repetition_penalty
    if t is not None and not (t == 0.0 or 0.0 < t <= 2.0):
        raise InvalidInput(f"{FIELD}.temperature must be 0 (greedy) or in (0, 2], got {t:g}",
                           field=f"{FIELD}.temperature")
    if p is not None and not 0.0 < p <= 1.0:
        raise InvalidInput(f"{FIELD}.top_p must be in (0, 1], got {p:g}", field=f"{FIELD}.top_p")
    if k is not None and k < 0:
        raise InvalidInput(f"{FIELD}.top_k must be >= 0 (0 disables it), got {k}", field=f"{FIELD}.top_k")
    if penalty is not None and not 1.0 <= penalty <= 2.0:
        raise InvalidInput(f"{FIELD}.repetition_penalty must be in [1, 2], got {penalty:g}",
                           field=f"{FIELD}.repetition_penalty")
    return defaults


def apply_defaults(requested: Sampling, defaults: Sampling) -> Sampling:
    """The request's sampling with each unset defaultable field taken from `defaults`; temperature 0
    (greedy) is left exactly as asked."""
    if requested.temperature == 0.0:
        return requested
    filled = {name: getattr(defaults, name) for name in DEFAULTABLE
              if getattr(requested, name) is None and getattr(defaults, name) is not None}
    return replace(requested, **filled) if filled else requested


def as_dict(defaults: Sampling) -> dict[str, float | int]:
    """The set defaults by name (for storage, the audit log and display)."""
    return {name: getattr(defaults, name) for name in DEFAULTABLE if getattr(defaults, name) is not None}

