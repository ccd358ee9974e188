"""The mesh policy: one YAML file that drives both the Python sidecar and the rendered Envoy config.

`load_policy(path)` parses and validates it (pydantic models, strict types, unknown keys refused) into
frozen objects; every error names the YAML path (`routes[1].retries.max_attempts: ...`). `Policy.route_for(method)` resolves a full method name
(`/pkg.Service/Method`) to the first matching route, `Policy.cluster_for(method)` to the service that
serves it. `PolicyWatcher` re-reads the file when its content hash changes; calls in flight keep the
objects they started with, new calls see the new policy.
"""

from __future__ import annotations

import fnmatch
import hashlib
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, ClassVar, Literal

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError

GRPC_CODES = {
    "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND", "ALREADY_EXISTS",
    "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION", "ABORTED", "OUT_OF_RANGE",
    "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS", "UNAUTHENTICATED",
}


class PolicyError(ValueError):
    """An invalid policy file; the message names the YAML path and what is expected."""


# --- the schema: pydantic models that are also the runtime types ----------------------------------
# Strict types (no "3" for 3, no true for 1); every check raises PydanticCustomError with the message the
# user sees, and `_policy_error` prefixes it with the YAML path of the value.

def _fail(message: str, at: str = "") -> PydanticCustomError:
    """`at`: a path below the value's own (`[2]`, `.v1`) when the check looked inside it."""
    return PydanticCustomError("policy", message, {"at": at})


def _bounded(value: object, minimum: float, maximum: float | None, exclusive_min: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _fail(f"expected a number, got {value!r}")
    bad_min = value <= minimum if exclusive_min else value < minimum
    if bad_min or (maximum is not None and value > maximum):
        bound = f"> {minimum}" if exclusive_min else f">= {minimum}"
        if maximum is not None:
            bound += f" and <= {maximum}"
        raise _fail(f"must be {bound}, got {value!r}")
    return float(value)


def _integer(value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _fail(f"expected an integer, got {value!r}")
    if value < minimum:
        raise _fail(f"must be >= {minimum}, got {value}")
    return value


def _strings(value: object) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list | tuple) or not value or not all(isinstance(v, str) and v for v in value):
        raise _fail(f"expected a non-empty list of strings, got {value!r}")
    return tuple(value)


def _string(value: object) -> str:
    if not isinstance(value, str) or not value:
        raise _fail(f"expected a non-empty string, got {value!r}")
    return value


def _boolean(value: object) -> bool:
    if not isinstance(value, bool):
        raise _fail(f"expected true or false, got {value!r}")
    return value


Strings = Annotated[tuple[str, ...], BeforeValidator(_strings)]
String = Annotated[str, BeforeValidator(_string)]
Boolean = Annotated[bool, BeforeValidator(_boolean)]
Seconds = Annotated[float, BeforeValidator(lambda v: _bounded(v, 0.0, None, True))]  # > 0
NonNegative = Annotated[float, BeforeValidator(lambda v: _bounded(v, 0.0, None, False))]
Ratio = Annotated[float, BeforeValidator(lambda v: _bounded(v, 0.0, 1.0, False))]  # 0..1
FailureRatio = Annotated[float, BeforeValidator(lambda v: _bounded(v, 0.0, 1.0, True))]  # (0, 1]
Percent = Annotated[int, BeforeValidator(lambda v: int(_bounded(v, 0.0, 100, False)))]
Count = Annotated[int, BeforeValidator(lambda v: _integer(v, 1))]  # >= 1


class _Section(BaseModel):
    """A mapping of the YAML document: unknown keys are refused with the list of known ones; empty = defaults."""

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)
    _internal: ClassVar[frozenset[str]] = frozenset()  # fields set by the loader, not by the file

    @model_validator(mode="before")
    @classmethod
    def _mapping(cls, data: object) -> object:
        if data is None:
            return {}
        if isinstance(data, BaseModel):
            return data
        if not isinstance(data, dict):
            raise _fail(f"expected a mapping, got {type(data).__name__}")
        known = [f.alias or name for name, f in cls.model_fields.items() if name not in cls._internal]
        unknown = sorted(set(map(str, data)) - set(known))
        if unknown:
            raise _fail(f"unknown key(s) {', '.join(unknown)}; expected some of {', '.join(known)}")
        return data


class Backoff(_Section):
    base_s: Seconds = 0.025
    max_s: Seconds = 0.25

    @model_validator(mode="after")
    def _ordered(self) -> Backoff:
        if self.max_s < self.base_s:
            raise _fail(f"must be >= base_s ({self.base_s}), got {self.max_s}", at=".max_s")
        return self


def _codes(value: object) -> tuple[str, ...]:
    codes = tuple(c.upper() for c in _strings(value))
    for i, code in enumerate(codes):
        if code not in GRPC_CODES:
            raise _fail(f"{code!r} is not a gRPC status code retried on; use e.g. UNAVAILABLE, RESOURCE_EXHAUSTED",
                        at=f"[{i}]")
    return codes


class RetryPolicy(_Section):
    retry_on: Annotated[tuple[str, ...], BeforeValidator(_codes)] = ("UNAVAILABLE",)
    max_attempts: Count = 3  # total attempts, the first one included; 1 = no retries
    per_try_timeout_s: Seconds | None = None
    backoff: Backoff = Backoff()


NO_RETRIES = RetryPolicy(max_attempts=1)


class RetryBudget(_Section):
    """Retries in flight may be at most `ratio` × requests in flight, but `min_per_s` retries a second are
    always allowed (so a quiet service can still retry)."""

    ratio: Ratio = 0.2
    min_per_s: NonNegative = 10.0


class BreakerPolicy(_Section):
    consecutive_failures: Count = 5
    failure_ratio: FailureRatio = 0.5
    window_s: Seconds = 10.0
    min_requests: Count = 20
    open_s: Seconds = 5.0
    half_open_probes: Count = 1


class OutlierPolicy(_Section):
    consecutive_failures: Count = 5
    base_ejection_s: Seconds = 30.0
    max_ejection_percent: Percent = 50


class RateLimit(_Section):
    """A token bucket per caller: `rps` tokens a second, at most `burst` saved up; at most `max_callers`
    buckets are kept (the least recently used is dropped)."""

    rps: Seconds
    burst: Count = 1
    max_callers: Count = 10_000

    @model_validator(mode="before")
    @classmethod
    def _default_burst(cls, data: object) -> object:
        if isinstance(data, dict) and "burst" not in data and isinstance(data.get("rps"), int | float) \
                and not isinstance(data.get("rps"), bool):
            return {**data, "burst": max(1, int(data["rps"]))}
        return data


def _versions(raw: object) -> tuple[tuple[str, int], ...]:
    if isinstance(raw, tuple):
        return raw
    if not isinstance(raw, dict) or not raw:
        raise _fail(f"expected a mapping of version label → traffic percent, got {raw!r}")
    versions: list[tuple[str, int]] = []
    for name, weight in raw.items():
        if not isinstance(name, str) or not re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", name):
            raise _fail(f"version label {name!r} must be a DNS label (e.g. v1, v2-canary)")
        if isinstance(weight, bool) or not isinstance(weight, int) or not 0 <= weight <= 100:
            raise _fail(f"expected a percent 0..100, got {weight!r}", at=f".{name}")
        versions.append((name, weight))
    total = sum(w for _, w in versions)
    if total != 100:
        raise _fail(f"the weights must add up to 100, got {total}")
    return tuple(versions)


class ServicePolicy(_Section):
    _internal: ClassVar[frozenset[str]] = frozenset({"name"})
    name: str = ""  # the key under `services`
    grpc_services: Strings
    public: Boolean = False
    # Calls to this service's own gRPC services must carry `authorization: Bearer <token>`; others are
    # refused at its sidecar's inbound listener with UNAUTHENTICATED (health and reflection stay open).
    require_bearer: Boolean = False
    max_concurrent: Count = 1024
    retry_budget: RetryBudget = RetryBudget()
    circuit_breaker: BreakerPolicy = BreakerPolicy()
    outlier: OutlierPolicy = OutlierPolicy()
    # Deployed versions and the share of traffic (percent) each gets in a mesh (Istio canary weights).
    versions: Annotated[tuple[tuple[str, int], ...], BeforeValidator(_versions)] = (("v1", 100),)


def _patterns(value: object) -> tuple[str, ...]:
    patterns = _strings(value)
    for i, pattern in enumerate(patterns):
        if pattern != "*" and "/" not in pattern:
            raise _fail(f"expected 'package.Service/Method' (globs allowed), got {pattern!r}", at=f"[{i}]")
    return tuple(p.lstrip("/") for p in patterns)


class Route(_Section):
    match: Annotated[tuple[str, ...], BeforeValidator(_patterns)]
    name: String = "default"
    timeout_s: Seconds | None = None
    retries: RetryPolicy = NO_RETRIES
    rate_limit: RateLimit | None = None

    def matches(self, method: str) -> bool:
        bare = method.lstrip("/")
        return any(fnmatch.fnmatchcase(bare, pattern) for pattern in self.match)


class AllowRule(_Section):
    source: String = Field(alias="from")  # service name, or "*"
    target: String = Field(alias="to")  # service name
    methods: Strings = ("*",)


class _Authorization(_Section):
    default: Literal["deny"] = "deny"
    allow: tuple[AllowRule, ...] = ()

    @field_validator("default", mode="before")
    @classmethod
    def _deny_only(cls, value: object) -> object:
        if value != "deny":
            raise _fail("only 'deny' is supported (list what is allowed)")
        return value


def _routes(value: object) -> object:
    if not isinstance(value, list):
        raise _fail(f"expected a list, got {type(value).__name__}")
    return [{"name": f"route-{i}", **raw} if isinstance(raw, dict) and "name" not in raw else raw
            for i, raw in enumerate(value)]


def _services(value: object) -> object:
    if not isinstance(value, dict) or not value:
        raise _fail("expected a mapping of service name → settings with at least one service")
    return {str(k): v for k, v in value.items()}


class _Document(_Section):
    version: Count = 1
    trust_domain: String = "autoglm.local"
    namespace: String = "default"
    services: Annotated[dict[str, ServicePolicy], BeforeValidator(_services)]
    routes: Annotated[tuple[Route, ...], BeforeValidator(_routes)] = ()
    authorization: _Authorization = _Authorization()

    @field_validator("version")
    @classmethod
    def _one(cls, value: int) -> int:
        if value != 1:
            raise _fail("only version 1 is understood")
        return value


DEFAULT_ROUTE = Route(match=("*",), name="default")


@dataclass(frozen=True)
class Policy:
    trust_domain: str
    namespace: str
    services: Mapping[str, ServicePolicy]
    routes: tuple[Route, ...]
    allow: tuple[AllowRule, ...]
    source_yaml: str = ""
    sha256: str = ""
    _by_grpc_service: dict[str, str] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        for svc in self.services.values():
            for grpc_service in svc.grpc_services:
                self._by_grpc_service[grpc_service] = svc.name

    def spiffe_id(self, service: str) -> str:
        return f"spiffe://{self.trust_domain}/ns/{self.namespace}/sa/{service}"

    def service_of_identity(self, identity: str) -> str | None:
        prefix = f"spiffe://{self.trust_domain}/ns/{self.namespace}/sa/"
        return identity[len(prefix):] if identity.startswith(prefix) else None

    def route_for(self, method: str) -> Route:
        for route in self.routes:
            if route.matches(method):
                return route
        return DEFAULT_ROUTE

    def cluster_for(self, method: str) -> str | None:
        """The service that serves `/pkg.Service/Method`, or None when no service lists it."""
        grpc_service = method.lstrip("/").split("/", 1)[0]
        return self._by_grpc_service.get(grpc_service)

    def allowed(self, source: str | None, target: str, method: str) -> bool:
        """Default deny: True only when a rule lets `source` call `method` on `target`."""
        if source is None:
            return False
        bare = method.lstrip("/")
        for rule in self.allow:
            if rule.target == target and rule.source in ("*", source):
                if any(fnmatch.fnmatchcase(bare, m) or fnmatch.fnmatchcase(bare.split("/", 1)[-1], m)
                       for m in rule.methods):
                    return True
        return False


# --- parsing -------------------------------------------------------------------------------------

def _path(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part.startswith("function-") or part.endswith("]"):
            continue  # pydantic's name for a validator step, not a YAML key
        else:
            out += f".{part}" if out else part
    return out


def _policy_error(exc: ValidationError) -> PolicyError:
    messages = []
    for err in exc.errors():
        ctx = err.get("ctx") or {}
        path = _path(tuple(err["loc"])) + str(ctx.get("at", ""))
        if err["type"] == "missing":
            message = "required"
        elif err["type"] == "literal_error" or err["type"] == "policy":
            message = err["msg"]
        else:
            message = f"{err['msg']}, got {err.get('input')!r}"
        messages.append(f"{path or '<root>'}: {message}")
    return PolicyError("; ".join(messages))


def parse_policy(text: str, source: str = "<policy>") -> Policy:
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise PolicyError(f"{source}: not valid YAML: {exc}") from None
    try:
        parsed = _Document.model_validate(doc)
    except ValidationError as exc:
        raise _policy_error(exc) from None
    services = {name: sp.model_copy(update={"name": name}) for name, sp in parsed.services.items()}
    for i, rule in enumerate(parsed.authorization.allow):
        for key, value in (("from", rule.source), ("to", rule.target)):
            if value not in services and not (key == "from" and value == "*"):
                raise PolicyError(f"authorization.allow[{i}].{key}: unknown service {value!r}; "
                                  f"known: {', '.join(services)}")
    return Policy(
        trust_domain=parsed.trust_domain, namespace=parsed.namespace, services=services, routes=parsed.routes,
        allow=parsed.authorization.allow, source_yaml=text, sha256=hashlib.sha256(text.encode()).hexdigest(),
    )


def load_policy(path: Path) -> Policy:
    try:
        text = path.read_text()
    except OSError as exc:
        raise PolicyError(f"{path}: cannot read the policy file: {exc.strerror}") from None
    try:
        return parse_policy(text, str(path))
    except PolicyError as exc:
        raise PolicyError(f"{path}: {exc}") from None


class PolicyWatcher:
    """Holds the policy in force and swaps it when the file's content changes (its SHA-256, not its mtime:
    a copy that keeps the timestamp, or two edits within the clock's resolution, are still seen).

    An invalid new file is reported through `on_error` (once per content) and the previous policy stays.
    """

    def __init__(self, path: Path, on_change: Callable[[Policy], None] | None = None,
                 on_error: Callable[[PolicyError], None] | None = None) -> None:
        self.path = path
        self.policy = load_policy(path)
        self.loaded_at = time.time()
        self._seen = self.policy.sha256
        self._on_change = on_change
        self._on_error = on_error

    def check(self) -> bool:
        """Reload if the file's content changed; True when a new policy came into force."""
        try:
            text = self.path.read_text()
        except OSError:
            return False
        digest = hashlib.sha256(text.encode()).hexdigest()
        if digest == self._seen:
            return False
        self._seen = digest
        try:
            policy = parse_policy(text, str(self.path))
        except PolicyError as exc:
            if self._on_error:
                self._on_error(PolicyError(f"{self.path}: {exc}"))
            return False
        self.policy, self.loaded_at = policy, time.time()
        if self._on_change:
            self._on_change(policy)
        return True
