"""Render the mesh policy as Istio resources, one intent per file (`make deploy-manifests`).

What maps to what (per service of the policy, Kubernetes Service name = service name):
- `destination-rules.yaml`: DestinationRule per service — `max_concurrent` → connectionPool.http
  (http2MaxRequests; http1MaxPendingRequests, which also bounds queued HTTP/2 requests), `outlier` → outlierDetection (consecutive5xxErrors and
  consecutiveGatewayErrors: gRPC UNAVAILABLE counts as 503; baseEjectionTime, maxEjectionPercent),
  `circuit_breaker.consecutive_failures` feeds nothing extra (Istio's breaker is the connection pool plus
  outlier detection, as in Envoy); one subset per `versions` entry (label `version`), ISTIO_MUTUAL TLS.
- `virtual-services.yaml`: VirtualService per service — each policy route that resolves any of the
  service's methods becomes one http route (first match wins, as in the policy) matching those methods'
  exact paths, with `timeout` = timeout_s and `retries` (attempts = max_attempts - 1, perTryTimeout,
  retryOn = the gRPC codes); a last catch-all prefix route per gRPC service; weights from `versions`.
- `peer-authentication.yaml`: mTLS STRICT for the namespace.
- `authorization-policies.yaml`: per non-public service an ALLOW policy (Istio denies what no ALLOW
  policy of a selected workload matches, so the policy's default deny holds): principal
  `<istio trust domain>/ns/<namespace>/sa/<from>` and the rule's method paths.

Not expressible in plain Istio resources and left to the sidecar/Envoy config: local rate limits (need an
EnvoyFilter), the retry budget and the client-deadline cap (`grpc_timeout_header_max`).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable
from typing import Any

from sidecar.envoy_render import ENVOY_RETRY_ON
from sidecar.k8s_render import dump_documents
from sidecar.methods import method_table
from sidecar.policy import Policy, Route

ISTIO_TRUST_DOMAIN = "cluster.local"
HEADER = ("# Rendered from {policy} by `make deploy-manifests` (sidecar/istio_render.py): do not edit by hand.\n"
          "# {intent}\n")
FILES = {
    "destination-rules.yaml": "DestinationRules: connection pool, outlier detection and version subsets.",
    "virtual-services.yaml": "VirtualServices: route timeouts, retries and canary weights.",
    "peer-authentication.yaml": "PeerAuthentication: mutual TLS required for every workload of the namespace.",
    "authorization-policies.yaml": "AuthorizationPolicies: which service identity may call which method.",
}


def duration(seconds: float) -> str:
    """An Istio duration string: whole seconds as `5s`, otherwise milliseconds as `25ms`."""
    if float(seconds).is_integer():
        return f"{int(seconds)}s"
    return f"{round(seconds * 1000)}ms"


def host(policy: Policy, service: str) -> str:
    return f"{service}.{policy.namespace}.svc.cluster.local"


def methods_of(policy: Policy, service: str) -> list[str]:
    grpc_services = policy.services[service].grpc_services
    return sorted(m for m in method_table() if m.lstrip("/").split("/", 1)[0] in grpc_services)


def _metadata(name: str, policy: Policy, service: str | None = None) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "namespace": policy.namespace}
    if service is not None:
        meta["labels"] = {"app": service}
    return meta


def destination_rule(policy: Policy, service: str) -> dict[str, Any]:
    sp = policy.services[service]
    return {
        "apiVersion": "networking.istio.io/v1", "kind": "DestinationRule",
        "metadata": _metadata(service, policy, service),
        "spec": {
            "host": host(policy, service),
            "trafficPolicy": {
                "tls": {"mode": "ISTIO_MUTUAL"},
                "connectionPool": {"http": {"http2MaxRequests": sp.max_concurrent,
                                            "http1MaxPendingRequests": sp.max_concurrent}},
                "outlierDetection": {
                    "consecutive5xxErrors": sp.outlier.consecutive_failures,
                    "consecutiveGatewayErrors": sp.outlier.consecutive_failures,
                    "interval": duration(min(10.0, sp.outlier.base_ejection_s)),
                    "baseEjectionTime": duration(sp.outlier.base_ejection_s),
                    "maxEjectionPercent": sp.outlier.max_ejection_percent,
                },
            },
            "subsets": [{"name": version, "labels": {"version": version}} for version, _ in sp.versions],
        },
    }


def _retries(route: Route) -> dict[str, Any]:
    retries = route.retries
    if retries.max_attempts <= 1:
        return {"attempts": 0}
    unsupported = [c for c in retries.retry_on if c not in ENVOY_RETRY_ON]
    if unsupported:
        raise ValueError(f"route {route.name}: Istio cannot retry on {', '.join(unsupported)}")
    out: dict[str, Any] = {"attempts": retries.max_attempts - 1,
                           "retryOn": ",".join(ENVOY_RETRY_ON[c] for c in retries.retry_on)}
    if retries.per_try_timeout_s is not None:
        out["perTryTimeout"] = duration(retries.per_try_timeout_s)
    return out


def _http_route(policy: Policy, service: str, route: Route, matches: list[dict[str, Any]]) -> dict[str, Any]:
    versions = policy.services[service].versions
    http: dict[str, Any] = {
        "name": route.name, "match": matches,
        "route": [{"destination": {"host": host(policy, service), "subset": version}, "weight": weight}
                  for version, weight in versions],
        "retries": _retries(route),
    }
    if route.timeout_s is not None:
        http["timeout"] = duration(route.timeout_s)
    return http


def virtual_service(policy: Policy, service: str) -> dict[str, Any]:
    grouped: dict[int, list[str]] = {}
    order = {id(r): i for i, r in enumerate(policy.routes)}
    routes_by_index: dict[int, Route] = {}
    for method in methods_of(policy, service):
        route = policy.route_for(method)
        index = order.get(id(route), len(policy.routes))
        grouped.setdefault(index, []).append(method)
        routes_by_index[index] = route
    http = [_http_route(policy, service, routes_by_index[i], [{"uri": {"exact": m}} for m in grouped[i]])
            for i in sorted(grouped)]
    for grpc_service in policy.services[service].grpc_services:  # methods the descriptors do not know
        prefix = f"/{grpc_service}/"
        fallback = _http_route(policy, service, policy.route_for(prefix + "*"), [{"uri": {"prefix": prefix}}])
        fallback["name"] = f"{fallback['name']}-{grpc_service.rsplit('.', 1)[-1].lower()}-other"
        http.append(fallback)
    # Anything else (grpc.health.v1, server reflection): the policy's default route, so nothing gets 404.
    catch_all = _http_route(policy, service, policy.route_for("/"), [{"uri": {"prefix": "/"}}])
    catch_all["name"] = "default"
    http.append(catch_all)
    return {
        "apiVersion": "networking.istio.io/v1", "kind": "VirtualService",
        "metadata": _metadata(service, policy, service),
        "spec": {"hosts": [host(policy, service)], "http": http},
    }


def peer_authentication(policy: Policy) -> dict[str, Any]:
    return {"apiVersion": "security.istio.io/v1", "kind": "PeerAuthentication",
            "metadata": _metadata("default", policy), "spec": {"mtls": {"mode": "STRICT"}}}


def istio_principal(policy: Policy, service: str, trust_domain: str = ISTIO_TRUST_DOMAIN) -> str:
    return f"{trust_domain}/ns/{policy.namespace}/sa/{service}"


def _paths(patterns: Iterable[str], policy: Policy, target: str) -> list[str]:
    """Istio `paths` support exact values and one `*` as a prefix or suffix; other globs are expanded
    over the target's known methods."""
    out: list[str] = []
    for pattern in patterns:
        bare = pattern.lstrip("/")
        if "/" not in bare:  # a bare method-name glob (`Get*`): any of the target's services
            bare = f"*/{bare}"
        if "*" not in bare and "?" not in bare:
            out.append("/" + bare)
        elif bare.endswith("*") and "*" not in bare[:-1] and "?" not in bare:
            out.append("/" + bare)
        else:
            out.extend(m for m in methods_of(policy, target) if fnmatch.fnmatchcase(m.lstrip("/"), bare))
    return sorted(dict.fromkeys(out))


def authorization_policy(policy: Policy, service: str, trust_domain: str = ISTIO_TRUST_DOMAIN) -> dict[str, Any]:
    rules = []
    for rule in policy.allow:
        if rule.target != service:
            continue
        # "*": any identity of the namespace (Istio matches a trailing `*` as a prefix).
        sources = [istio_principal(policy, rule.source, trust_domain)]
        rules.append({"from": [{"source": {"principals": sources}}],
                      "to": [{"operation": {"paths": _paths(rule.methods, policy, service)}}]})
    spec: dict[str, Any] = {"selector": {"matchLabels": {"app": service}}, "action": "ALLOW"}
    if rules:
        spec["rules"] = rules
    # With no rules, an ALLOW policy matches nothing: every call to the service is denied (default deny).
    return {"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
            "metadata": _metadata(f"{service}-allow", policy, service), "spec": spec}


def render(policy: Policy, trust_domain: str = ISTIO_TRUST_DOMAIN) -> dict[str, list[dict[str, Any]]]:
    """File name → its documents."""
    services = list(policy.services)
    return {
        "destination-rules.yaml": [destination_rule(policy, s) for s in services],
        "virtual-services.yaml": [virtual_service(policy, s) for s in services],
        "peer-authentication.yaml": [peer_authentication(policy)],
        "authorization-policies.yaml": [authorization_policy(policy, s, trust_domain)
                                        for s in services if not policy.services[s].public],
    }


def render_files(policy: Policy, policy_label: str) -> dict[str, str]:
    return {name: HEADER.format(policy=policy_label, intent=FILES[name]) + dump_documents(docs)
            for name, docs in render(policy).items()}
