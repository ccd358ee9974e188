"""The router's request path, shared by both transports (gRPC `servicer.py`, OpenAI HTTP `http/`).

`Gateway` (facade.py) runs a request through four rooms, each knowing only the ones before it:
`plan.py` (validate, resolve, bound, cache key) → `admit.py` (queue room, rate limit, budget hold,
priority slot, early start) → `dispatch.py` (cache, single-flight, generation with retries and fallbacks)
→ `account.py` (one usage event, access log, context turn).
"""

from services.router.gateway.account import Accountant
from services.router.gateway.admit import NO_HOLD, Admitter, EarlyStart
from services.router.gateway.dispatch import Dispatcher, Progress
from services.router.gateway.facade import Gateway, GatewaySettings
from services.router.gateway.plan import (
    MAX_TAG_LENGTH,
    MAX_TAGS,
    TEMPLATE_TOKENS_FIXED,
    TEMPLATE_TOKENS_PER_MESSAGE,
    Plan,
    Planner,
    effective_class,
    prompt_token_bound,
    validate_tags,
)

__all__ = [
    "MAX_TAGS", "MAX_TAG_LENGTH", "NO_HOLD", "TEMPLATE_TOKENS_FIXED", "TEMPLATE_TOKENS_PER_MESSAGE", "Accountant",
    "Admitter", "Dispatcher", "EarlyStart", "Gateway", "GatewaySettings", "Plan", "Planner", "Progress",
    "effective_class", "prompt_token_bound", "validate_tags",
]
