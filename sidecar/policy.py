"""The mesh policy: one YAML file that drives both the Python sidecar and the rendered Envoy config.

`load_policy(path)` parses and validates it into frozen dataclasses; every error names the YAML path
(`routes[1].retries.max_attempts: ...`). `Policy.route_for(method)` resolves a full method name
(`/pkg.Service/Method`) to the first matching route, `Policy.cluster_for(method)` to the service that
serves it. `PolicyWatcher` re-reads the file when its content hash changes; calls in flight keep the
objects they started with, new calls see the new policy.
"""

from __future__ import annotations

import fnmatch
import hashlib
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

GRPC_CODES = {
    "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND", "ALREADY_EXISTS",
    "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION", "ABORTED", "OUT_OF_RANGE",
    "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS", "UNAUTHENTICATED",
}


class PolicyError(ValueError):
    """An invalid policy file; the message names the YAML path and what is expected."""


@dataclass(frozen=True)
class Backoff:
    base_s: float = 0.025
    max_s: float = 0.25


@dataclass(frozen=True)
class RetryPolicy:
    retry_on: tuple[str, ...] = ("UNAVAILABLE",)
    max_attempts: int = 1  # total attempts, the first one included; 1 = no retries
    per_try_timeout_s: float | None = None
    backoff: Backoff = Backoff()


@dataclass(frozen=True)
class RetryBudget:
    """Retries in flight may be at most `ratio` × requests in flight, but `min_per_s` retries a second are
    always allowed (so a quiet service can still retry)."""

    ratio: float = 0.2
    min_per_s: float = 10.0


@dataclass(frozen=True)
class BreakerPolicy:
    consecutive_failures: int = 5
    failure_ratio: float = 0.5
    window_s: float = 10.0
    min_requests: int = 20
    open_s: float = 5.0
    half_open_probes: int = 1


@dataclass(frozen=True)
class OutlierPolicy:
    consecutive_failures: int = 5
    base_ejection_s: float = 30.0
    max_ejection_percent: int = 50


@dataclass(frozen=True)
class RateLimit:
    rps: float
    burst: int


@dataclass(frozen=True)
class ServicePolicy:
    name: str
    grpc_services: tuple[str, ...]
    public: bool = False
    max_concurrent: int = 1024
    retry_budget: RetryBudget = RetryBudget()
    circuit_breaker: BreakerPolicy = BreakerPolicy()
    outlier: OutlierPolicy = OutlierPolicy()
    # Deployed versions and the share of traffic (percent) each gets in a mesh (Istio canary weights).
    versions: tuple[tuple[str, int], ...] = (("v1", 100),)


@dataclass(frozen=True)
class Route:
    match: tuple[str, ...]
    name: str = "default"
    timeout_s: float | None = None
    retries: RetryPolicy = RetryPolicy()
    rate_limit: RateLimit | None = None

    def matches(self, method: str) -> bool:
        bare = method.lstrip("/")
        return any(fnmatch.fnmatchcase(bare, pattern) for pattern in self.match)


@dataclass(frozen=True)
class AllowRule:
    source: str  # service name, or "*"
    target: str  # service name
    methods: tuple[str, ...] = ("*",)


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

def _type_name(value: object) -> str:
    return type(value).__name__


class _Reader:
    """Typed access to one mapping of the YAML document, with errors that name the path."""

    def __init__(self, data: object, path: str, known: Sequence[str]) -> None:
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise PolicyError(f"{path or '<root>'}: expected a mapping, got {_type_name(data)}")
        unknown = sorted(set(map(str, data)) - set(known))
        if unknown:
            raise PolicyError(f"{path or '<root>'}: unknown key(s) {', '.join(unknown)}; "
                              f"expected some of {', '.join(known)}")
        self.data: dict[str, Any] = data
        self.path = path

    def at(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def number(self, key: str, default: float | None, *, minimum: float = 0.0, maximum: float | None = None,
               exclusive_min: bool = False) -> float | None:
        value = self.data.get(key, default)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise PolicyError(f"{self.at(key)}: expected a number, got {value!r}")
        bad_min = value <= minimum if exclusive_min else value < minimum
        if bad_min or (maximum is not None and value > maximum):
            bound = f"> {minimum}" if exclusive_min else f">= {minimum}"
            if maximum is not None:
                bound += f" and <= {maximum}"
            raise PolicyError(f"{self.at(key)}: must be {bound}, got {value!r}")
        return float(value)

    def req_number(self, key: str, default: float, **kw: Any) -> float:
        value = self.number(key, default, **kw)
        assert value is not None
        return value

    def integer(self, key: str, default: int, *, minimum: int = 0) -> int:
        value = self.data.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int):
            raise PolicyError(f"{self.at(key)}: expected an integer, got {value!r}")
        if value < minimum:
            raise PolicyError(f"{self.at(key)}: must be >= {minimum}, got {value}")
        return value

    def string(self, key: str, default: str | None = None) -> str:
        value = self.data.get(key, default)
        if not isinstance(value, str) or not value:
            raise PolicyError(f"{self.at(key)}: expected a non-empty string, got {value!r}")
        return value

    def strings(self, key: str, default: Sequence[str] | None = None) -> tuple[str, ...]:
        value = self.data.get(key, default)
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list | tuple) or not value or not all(isinstance(v, str) and v for v in value):
            raise PolicyError(f"{self.at(key)}: expected a non-empty list of strings, got {value!r}")
        return tuple(value)

    def boolean(self, key: str, default: bool) -> bool:
        value = self.data.get(key, default)
        if not isinstance(value, bool):
            raise PolicyError(f"{self.at(key)}: expected true or false, got {value!r}")
        return value

    def child(self, key: str, known: Sequence[str]) -> _Reader | None:
        if key not in self.data:
            return None
        return _Reader(self.data[key], self.at(key), known)


def _retry_budget(r: _Reader | None) -> RetryBudget:
    if r is None:
        return RetryBudget()
    return RetryBudget(ratio=r.req_number("ratio", RetryBudget.ratio, maximum=1.0),
                       min_per_s=r.req_number("min_per_s", RetryBudget.min_per_s))


def _breaker(r: _Reader | None) -> BreakerPolicy:
    if r is None:
        return BreakerPolicy()
    d = BreakerPolicy()
    return BreakerPolicy(
        consecutive_failures=r.integer("consecutive_failures", d.consecutive_failures, minimum=1),
        failure_ratio=r.req_number("failure_ratio", d.failure_ratio, maximum=1.0, exclusive_min=True),
        window_s=r.req_number("window_s", d.window_s, exclusive_min=True),
        min_requests=r.integer("min_requests", d.min_requests, minimum=1),
        open_s=r.req_number("open_s", d.open_s, exclusive_min=True),
        half_open_probes=r.integer("half_open_probes", d.half_open_probes, minimum=1),
    )


def _outlier(r: _Reader | None) -> OutlierPolicy:
    if r is None:
        return OutlierPolicy()
    d = OutlierPolicy()
    return OutlierPolicy(
        consecutive_failures=r.integer("consecutive_failures", d.consecutive_failures, minimum=1),
        base_ejection_s=r.req_number("base_ejection_s", d.base_ejection_s, exclusive_min=True),
        max_ejection_percent=int(r.req_number("max_ejection_percent", d.max_ejection_percent, maximum=100)),
    )


def _versions(s: _Reader) -> tuple[tuple[str, int], ...]:
    raw = s.data.get("versions")
    if raw is None:
        return (("v1", 100),)
    if not isinstance(raw, dict) or not raw:
        raise PolicyError(f"{s.at('versions')}: expected a mapping of version label → traffic percent, got {raw!r}")
    versions: list[tuple[str, int]] = []
    for name, weight in raw.items():
        if not isinstance(name, str) or not re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", name):
            raise PolicyError(f"{s.at('versions')}: version label {name!r} must be a DNS label (e.g. v1, v2-canary)")
        if isinstance(weight, bool) or not isinstance(weight, int) or not 0 <= weight <= 100:
            raise PolicyError(f"{s.at('versions')}.{name}: expected a percent 0..100, got {weight!r}")
        versions.append((name, weight))
    total = sum(w for _, w in versions)
    if total != 100:
        raise PolicyError(f"{s.at('versions')}: the weights must add up to 100, got {total}")
    return tuple(versions)


def _codes(r: _Reader, key: str) -> tuple[str, ...]:
    codes = tuple(c.upper() for c in r.strings(key, ["UNAVAILABLE"]))
    for i, code in enumerate(codes):
        if code not in GRPC_CODES:
            raise PolicyError(f"{r.at(key)}[{i}]: {code!r} is not a gRPC status code retried on; "
                              f"use e.g. UNAVAILABLE, RESOURCE_EXHAUSTED")
    return codes


def _retries(r: _Reader | None) -> RetryPolicy:
    if r is None:
        return RetryPolicy()
    b = r.child("backoff", ["base_s", "max_s"])
    backoff = Backoff()
    if b is not None:
        backoff = Backoff(base_s=b.req_number("base_s", Backoff.base_s, exclusive_min=True),
                          max_s=b.req_number("max_s", Backoff.max_s, exclusive_min=True))
        if backoff.max_s < backoff.base_s:
            raise PolicyError(f"{b.at('max_s')}: must be >= base_s ({backoff.base_s}), got {backoff.max_s}")
    return RetryPolicy(
        retry_on=_codes(r, "retry_on"),
        max_attempts=r.integer("max_attempts", 3, minimum=1),
        per_try_timeout_s=r.number("per_try_timeout_s", None, exclusive_min=True),
        backoff=backoff,
    )


def _route(r: _Reader, index: int) -> Route:
    patterns = r.strings("match")
    for i, pattern in enumerate(patterns):
        if pattern != "*" and "/" not in pattern:
            raise PolicyError(f"{r.at('match')}[{i}]: expected 'package.Service/Method' (globs allowed), "
                              f"got {pattern!r}")
    rl = r.child("rate_limit", ["rps", "burst"])
    rate_limit = None
    if rl is not None:
        rps = rl.req_number("rps", 0.0, exclusive_min=True)
        rate_limit = RateLimit(rps=rps, burst=rl.integer("burst", max(1, int(rps)), minimum=1))
    return Route(
        match=tuple(p.lstrip("/") for p in patterns),
        name=r.string("name", f"route-{index}"),
        timeout_s=r.number("timeout_s", None, exclusive_min=True),
        retries=_retries(r.child("retries", ["retry_on", "max_attempts", "per_try_timeout_s", "backoff"])),
        rate_limit=rate_limit,
    )


def parse_policy(text: str, source: str = "<policy>") -> Policy:
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise PolicyError(f"{source}: not valid YAML: {exc}") from None
    root = _Reader(doc, "", ["version", "trust_domain", "namespace", "services", "routes", "authorization"])
    if root.integer("version", 1, minimum=1) != 1:
        raise PolicyError("version: only version 1 is understood")
    services_raw = root.data.get("services")
    if not isinstance(services_raw, dict) or not services_raw:
        raise PolicyError("services: expected a mapping of service name → settings with at least one service")
    services: dict[str, ServicePolicy] = {}
    for name, raw in services_raw.items():
        s = _Reader(raw, f"services.{name}", ["grpc_services", "public", "max_concurrent", "retry_budget",
                                               "circuit_breaker", "outlier", "versions"])
        services[str(name)] = ServicePolicy(
            name=str(name),
            grpc_services=s.strings("grpc_services"),
            public=s.boolean("public", False),
            max_concurrent=s.integer("max_concurrent", 1024, minimum=1),
            retry_budget=_retry_budget(s.child("retry_budget", ["ratio", "min_per_s"])),
            circuit_breaker=_breaker(s.child("circuit_breaker", ["consecutive_failures", "failure_ratio",
                                                                  "window_s", "min_requests", "open_s",
                                                                  "half_open_probes"])),
            outlier=_outlier(s.child("outlier", ["consecutive_failures", "base_ejection_s",
                                                 "max_ejection_percent"])),
            versions=_versions(s),
        )
    routes_raw = root.data.get("routes", [])
    if not isinstance(routes_raw, list):
        raise PolicyError(f"routes: expected a list, got {_type_name(routes_raw)}")
    routes = tuple(
        _route(_Reader(raw, f"routes[{i}]", ["name", "match", "timeout_s", "retries", "rate_limit"]), i)
        for i, raw in enumerate(routes_raw)
    )
    authz = root.child("authorization", ["default", "allow"])
    allow: list[AllowRule] = []
    if authz is not None:
        if authz.data.get("default", "deny") != "deny":
            raise PolicyError("authorization.default: only 'deny' is supported (list what is allowed)")
        rules = authz.data.get("allow", [])
        if not isinstance(rules, list):
            raise PolicyError(f"authorization.allow: expected a list, got {_type_name(rules)}")
        for i, raw in enumerate(rules):
            a = _Reader(raw, f"authorization.allow[{i}]", ["from", "to", "methods"])
            rule = AllowRule(source=a.string("from"), target=a.string("to"), methods=a.strings("methods", ["*"]))
            for key, value in (("from", rule.source), ("to", rule.target)):
                if value not in services and not (key == "from" and value == "*"):
                    raise PolicyError(f"{a.at(key)}: unknown service {value!r}; known: {', '.join(services)}")
            allow.append(rule)
    return Policy(
        trust_domain=root.string("trust_domain", "autoglm.local"),
        namespace=root.string("namespace", "default"),
        services=services, routes=routes, allow=tuple(allow),
        source_yaml=text, sha256=hashlib.sha256(text.encode()).hexdigest(),
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
    """Holds the policy in force and swaps it when the file's content changes.

    An invalid new file is reported through `on_error` and the previous policy stays in force.
    """

    def __init__(self, path: Path, on_change: Callable[[Policy], None] | None = None,
                 on_error: Callable[[PolicyError], None] | None = None) -> None:
        self.path = path
        self.policy = load_policy(path)
        self.loaded_at = time.time()
        self._mtime = path.stat().st_mtime_ns
        self._on_change = on_change
        self._on_error = on_error

    def check(self) -> bool:
        """Reload if the file changed; True when a new policy came into force."""
        try:
            mtime = self.path.stat().st_mtime_ns
        except OSError:
            return False
        if mtime == self._mtime:
            return False
        self._mtime = mtime
        try:
            policy = load_policy(self.path)
        except PolicyError as exc:
            if self._on_error:
                self._on_error(exc)
            return False
        if policy.sha256 == self.policy.sha256:
            return False
        self.policy, self.loaded_at = policy, time.time()
        if self._on_change:
            self._on_change(policy)
        return True
