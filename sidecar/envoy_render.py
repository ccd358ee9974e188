"""Render the mesh policy as an Envoy v3 bootstrap for one service (built with envoy-data-plane).

What maps to what:
- inbound listener (mTLS, client certificate required unless the service is `public`) → cluster `local`;
  an RBAC filter allows exactly the policy's `authorization.allow` rules (principal = the caller's SPIFFE
  URI SAN, permission = the method path), default deny. `x-forwarded-client-cert` is SANITIZE_SET: a
  caller's copy is dropped and the service gets `By=<own id>;Hash=…;URI=<verified peer id>`.
- outbound listener (plaintext, loopback) → one cluster per peer, originating mTLS with the sidecar's own
  certificate and checking the peer's SPIFFE URI SAN.
- every known method gets an exact-path route: `timeout_s` → max_stream_duration and
  grpc_timeout_header_max (the smaller of client deadline and route timeout wins); `retries` → retry_policy
  (gRPC retry_on, num_retries = max_attempts - 1, per_try_timeout, exponential back-off); `rate_limit` → a
  local_ratelimit token bucket per caller, as the Python sidecar keeps: a wildcard descriptor on the
  `authorization` header (one bucket per distinct bearer token, at most `max_callers` in Envoy's LRU);
  calls without one share the route's default bucket; a refusal is RESOURCE_EXHAUSTED.
- `require_bearer` → a route per own gRPC service, first, that answers a call whose `authorization` is not
  `Bearer <token>` with a local 401 (gRPC UNAUTHENTICATED) before it reaches the service.
- per cluster: `max_concurrent` → circuit_breakers max_requests/max_pending_requests; `retry_budget` →
  retry_budget (budget_percent = ratio × 100, min_retry_concurrency = min_per_s: Envoy's floor counts
  retries in flight, not per second); `outlier` → outlier_detection (consecutive gateway failures and
  local-origin failures, base ejection time, max ejection percent). Envoy has no consecutive-failure
  breaker; the outlier detector plays that part.
- `ports.http` + `http_upstream` (the router's OpenAI-compatible API): a public HTTPS listener (the
  service's certificate, no client certificate, HTTP/1.1 or h2) → cluster `local_http`, plain HTTP/1.1 to
  the service; no route timeout, a long stream idle timeout, no buffering filter, the caller's
  `x-request-id` kept, and with `require_bearer` a `/v1/` call without `Bearer <token>` answered with a
  local 401 in OpenAI's error shape.
- several copies of the service (`upstream` / `http_upstream` comma-separated, e.g. `router.replicas`):
  `local` and `local_http` become LEAST_REQUEST clusters over all of them (each call or HTTP request to
  the copy with the fewest in flight), with an active health check (gRPC health for `local`, TCP connect
  for `local_http`) that leaves a stopped or draining copy out until it serves again.
- TLS on every listener and peer cluster: TLS 1.2 at least, TLS 1.3 preferred (`tls_params`). The
  sidecar's own certificate comes through file-based SDS (`<certs>/<service>.sds.yaml`, written with the
  certificate): Envoy watches the certificate directory and loads a renewed certificate and key for new
  connections, without a restart; established connections and their streams carry on.
"""

from __future__ import annotations

import datetime as dt
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import betterproto2
import yaml
from envoy_data_plane.envoy.config.accesslog.v3 import AccessLog as EnvoyAccessLog
from envoy_data_plane.envoy.config.bootstrap.v3 import Admin, Bootstrap, BootstrapStaticResources
from envoy_data_plane.envoy.config.cluster.v3 import (
    CircuitBreakers,
    CircuitBreakersThresholds,
    CircuitBreakersThresholdsRetryBudget,
    Cluster,
    ClusterDiscoveryType,
    ClusterLbPolicy,
    OutlierDetection,
)
from envoy_data_plane.envoy.config.core.v3 import (
    Address,
    ApiVersion,
    ConfigSource,
    DataSource,
    GrpcService,
    GrpcServiceEnvoyGrpc,
    HeaderValue,
    HeaderValueOption,
    HealthCheck,
    HealthCheckGrpcHealthCheck,
    HealthCheckTcpHealthCheck,
    Http2ProtocolOptions,
    Node,
    PathConfigSource,
    RuntimeFractionalPercent,
    SocketAddress,
    SubstitutionFormatString,
    TransportSocket,
)
from envoy_data_plane.envoy.config.endpoint.v3 import ClusterLoadAssignment, Endpoint, LbEndpoint, LocalityLbEndpoints
from envoy_data_plane.envoy.config.listener.v3 import Filter, FilterChain, Listener
from envoy_data_plane.envoy.config.rbac.v3 import Permission, Principal, Rbac, RbacAction
from envoy_data_plane.envoy.config.rbac.v3 import Policy as RbacPolicy
from envoy_data_plane.envoy.config.route.v3 import (
    DirectResponseAction,
    HeaderMatcher,
    RateLimit,
    RateLimitAction,
    RateLimitActionRequestHeaders,
    RetryPolicy,
    RetryPolicyRetryBackOff,
    Route,
    RouteAction,
    RouteActionMaxStreamDuration,
    RouteConfiguration,
    RouteMatch,
    VirtualHost,
)
from envoy_data_plane.envoy.config.trace.v3 import OpenTelemetryConfig, TracingHttp
from envoy_data_plane.envoy.extensions.access_loggers.stream.v3 import StdoutAccessLog
from envoy_data_plane.envoy.extensions.common.ratelimit.v3 import LocalRateLimitDescriptor, RateLimitDescriptorEntry
from envoy_data_plane.envoy.extensions.filters.http.local_ratelimit.v3 import LocalRateLimit
from envoy_data_plane.envoy.extensions.filters.http.rbac.v3 import Rbac as RbacFilter
from envoy_data_plane.envoy.extensions.filters.http.router.v3 import Router
from envoy_data_plane.envoy.extensions.filters.network.http_connection_manager.v3 import (
    HttpConnectionManager,
    HttpConnectionManagerCodecType,
    HttpConnectionManagerForwardClientCertDetails,
    HttpConnectionManagerServerHeaderTransformation,
    HttpConnectionManagerSetCurrentClientCertDetails,
    HttpConnectionManagerTracing,
    HttpFilter,
)
from envoy_data_plane.envoy.extensions.transport_sockets.tls.v3 import (
    CertificateValidationContext,
    CommonTlsContext,
    DownstreamTlsContext,
    SdsSecretConfig,
    SubjectAltNameMatcher,
    SubjectAltNameMatcherSanType,
    TlsParameters,
    TlsParametersTlsProtocol,
    UpstreamTlsContext,
)
from envoy_data_plane.envoy.extensions.upstreams.http.v3 import (
    HttpProtocolOptions,
    HttpProtocolOptionsExplicitHttpConfig,
)
from envoy_data_plane.envoy.type.matcher.v3 import RegexMatcher, StringMatcher
from envoy_data_plane.envoy.type.v3 import FractionalPercent, FractionalPercentDenominatorType, Percent, TokenBucket
from envoy_data_plane.google.protobuf import Any as PbAny
from envoy_data_plane.google.protobuf import Struct

from sidecar.certs import sds_path
from sidecar.methods import method_table
from sidecar.policy import Policy, PolicyError, load_policy
from sidecar.policy import Route as PolicyRoute

ENVOY_RETRY_ON = {"CANCELLED": "cancelled", "DEADLINE_EXCEEDED": "deadline-exceeded", "INTERNAL": "internal",
                  "RESOURCE_EXHAUSTED": "resource-exhausted", "UNAVAILABLE": "unavailable"}
HTTP2_OPTIONS_KEY = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
ACCESS_LOG_FORMAT = {
    "method": "%REQ(:PATH)%", "grpc_status": "%GRPC_STATUS%", "duration_ms": "%DURATION%",
    "bytes_in": "%BYTES_RECEIVED%", "bytes_out": "%BYTES_SENT%", "peer": "%DOWNSTREAM_PEER_URI_SAN%",
    "traceparent": "%REQ(TRACEPARENT)%", "request_id": "%REQ(X-REQUEST-ID)%", "upstream": "%UPSTREAM_HOST%",
    "flags": "%RESPONSE_FLAGS%",
}


@dataclass(frozen=True)
class EnvoyPorts:
    inbound: int
    outbound: int | None
    admin: int
    # The public HTTPS port of an HTTP service behind this sidecar (the router's OpenAI-compatible API).
    http: int | None = None


def _seconds(value: float) -> dt.timedelta:
    return dt.timedelta(seconds=value)


def _socket(address: str) -> Address:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"expected HOST:PORT, got {address!r}")
    return Address(socket_address=SocketAddress(address=host, port_value=int(port)))


def glob_to_regex(pattern: str) -> str:
    """A policy glob (`pkg.Service/*`) as an RE2 regex over the HTTP/2 :path."""
    out = []
    for ch in pattern.lstrip("/"):
        out.append(".*" if ch == "*" else "." if ch == "?" else re.escape(ch))
    return "/" + "".join(out)


def _common_tls(certs_dir: Path, service: str, san_prefix: str | None, san_exact: str | None) -> CommonTlsContext:
    matchers = []
    if san_exact is not None:
        matchers.append(SubjectAltNameMatcher(san_type=SubjectAltNameMatcherSanType.URI,
                                              matcher=StringMatcher(exact=san_exact)))
    if san_prefix is not None:
        matchers.append(SubjectAltNameMatcher(san_type=SubjectAltNameMatcherSanType.URI,
                                              matcher=StringMatcher(prefix=san_prefix)))
    return CommonTlsContext(
        tls_params=TlsParameters(tls_minimum_protocol_version=TlsParametersTlsProtocol.TLSv1_2,
                                 tls_maximum_protocol_version=TlsParametersTlsProtocol.TLSv1_3),
        tls_certificate_sds_secret_configs=[SdsSecretConfig(name=service, sds_config=ConfigSource(
            path_config_source=PathConfigSource(path=str(sds_path(certs_dir, service))),
            resource_api_version=ApiVersion.V3))],
        validation_context=CertificateValidationContext(
            trusted_ca=DataSource(filename=str(certs_dir / "ca.pem")), match_typed_subject_alt_names=matchers),
        alpn_protocols=["h2"],
    )


def _methods_of(policy: Policy, service: str) -> list[str]:
    grpc_services = policy.services[service].grpc_services
    return sorted(m for m in method_table() if m.lstrip("/").split("/", 1)[0] in grpc_services)


def _route(method_path: str, rule: PolicyRoute, cluster: str, *, retries: bool, exact: bool) -> Route:
    action = RouteAction(cluster=cluster, timeout=_seconds(0))
    if rule.timeout_s is not None:
        action.max_stream_duration = RouteActionMaxStreamDuration(
            max_stream_duration=_seconds(rule.timeout_s), grpc_timeout_header_max=_seconds(rule.timeout_s))
    if retries and rule.retries.max_attempts > 1:
        unsupported = [c for c in rule.retries.retry_on if c not in ENVOY_RETRY_ON]
        if unsupported:
            raise ValueError(f"route {rule.name}: Envoy cannot retry on {', '.join(unsupported)}")
        action.retry_policy = RetryPolicy(
            retry_on=",".join(ENVOY_RETRY_ON[c] for c in rule.retries.retry_on),
            num_retries=rule.retries.max_attempts - 1,
            per_try_timeout=_seconds(rule.retries.per_try_timeout_s) if rule.retries.per_try_timeout_s else None,
            retry_back_off=RetryPolicyRetryBackOff(base_interval=_seconds(rule.retries.backoff.base_s),
                                                   max_interval=_seconds(rule.retries.backoff.max_s)))
    match = RouteMatch(path=method_path) if exact else RouteMatch(prefix=method_path)
    route = Route(name=f"{rule.name}:{method_path}", match=match, route=action)
    if rule.rate_limit is not None:
        bucket = _token_bucket(rule.rate_limit.rps, rule.rate_limit.burst)
        limit = LocalRateLimit(
            stat_prefix=f"ratelimit_{rule.name}",
            token_bucket=bucket,  # calls that carry no `authorization` header
            descriptors=[LocalRateLimitDescriptor(entries=[RateLimitDescriptorEntry(key=CALLER_DESCRIPTOR)],
                                                  token_bucket=bucket)],
            rate_limits=[RateLimit(actions=[RateLimitAction(request_headers=RateLimitActionRequestHeaders(
                header_name="authorization", descriptor_key=CALLER_DESCRIPTOR))])],
            max_dynamic_descriptors=rule.rate_limit.max_callers,
            always_consume_default_token_bucket=False,
            rate_limited_as_resource_exhausted=True,
            filter_enabled=RuntimeFractionalPercent(default_value=FractionalPercent(
                numerator=100, denominator=FractionalPercentDenominatorType.HUNDRED), runtime_key="rl_enabled"),
            filter_enforced=RuntimeFractionalPercent(default_value=FractionalPercent(
                numerator=100, denominator=FractionalPercentDenominatorType.HUNDRED), runtime_key="rl_enforced"))
        route.typed_per_filter_config = {"envoy.filters.http.local_ratelimit": PbAny.pack(limit)}
    return route


CALLER_DESCRIPTOR = "caller"


def _token_bucket(rps: float, burst: int) -> TokenBucket:
    """`rps` tokens a second, `burst` at most; a rate under one a second refills one token less often."""
    if rps >= 1:
        return TokenBucket(max_tokens=burst, tokens_per_fill=int(rps), fill_interval=_seconds(1))
    return TokenBucket(max_tokens=burst, tokens_per_fill=1, fill_interval=_seconds(1 / rps))


# RFC 6750 `b64token` after the scheme, as sidecar.ratelimit.bearer_token accepts it.
BEARER_REGEX = r"[Bb][Ee][Aa][Rr][Ee][Rr] +[A-Za-z0-9\-._~+/]+=* *"  # (RE2 caps {n,m} at 1000: no length here)
BEARER_REFUSAL = "missing or malformed credentials: send metadata 'authorization: Bearer <API key or JWT>'"


def _bearer_refusals(policy: Policy, service: str) -> list[Route]:
    """`require_bearer`: a call to the service's own methods whose `authorization` is missing or not
    `Bearer <token>` is answered by Envoy itself: HTTP 401 as a gRPC local reply is UNAUTHENTICATED."""
    def refusal(grpc_service: str) -> Route:
        not_bearer = HeaderMatcher(name="authorization", invert_match=True, treat_missing_header_as_empty=True,
                                   string_match=StringMatcher(safe_regex=RegexMatcher(regex=BEARER_REGEX)))
        return Route(name=f"require-bearer:/{grpc_service}/",
                     match=RouteMatch(prefix=f"/{grpc_service}/", headers=[not_bearer]),
                     direct_response=DirectResponseAction(status=401, body=DataSource(inline_string=BEARER_REFUSAL)))

    return [refusal(grpc_service)
            for grpc_service in policy.services[service].grpc_services]


def _routes_for(policy: Policy, service: str, cluster: str, *, retries: bool) -> list[Route]:
    routes = [_route(m, policy.route_for(m), cluster, retries=retries, exact=True) for m in _methods_of(policy, service)]
    for grpc_service in policy.services[service].grpc_services:  # methods the descriptors do not know
        prefix = f"/{grpc_service}/"
        routes.append(_route(prefix, policy.route_for(prefix + "*"), cluster, retries=retries, exact=False))
    return routes


def _rbac(policy: Policy, service: str) -> RbacFilter:
    policies: dict[str, RbacPolicy] = {}
    for index, rule in enumerate(policy.allow):
        if rule.target != service:
            continue
        grpc_services = policy.services[service].grpc_services
        patterns = [m if "/" in m else f"{s}/{m}" for m in rule.methods for s in grpc_services] \
            if rule.methods != ("*",) else [f"{s}/*" for s in grpc_services]
        permissions = [Permission(url_path=_path_matcher(p)) for p in patterns]
        principal = (Principal(any=True) if rule.source == "*" else Principal(
            authenticated=_authenticated(policy.spiffe_id(rule.source))))
        policies[f"allow-{index}-{rule.source}-to-{rule.target}"] = RbacPolicy(
            permissions=[Permission(or_rules=_permission_set(permissions))], principals=[principal])
    return RbacFilter(rules=Rbac(action=RbacAction.ALLOW, policies=policies))


def _path_matcher(pattern: str) -> Any:
    from envoy_data_plane.envoy.type.matcher.v3 import PathMatcher

    return PathMatcher(path=StringMatcher(safe_regex=RegexMatcher(regex=glob_to_regex(pattern))))


def _permission_set(permissions: Sequence[Permission]) -> Any:
    from envoy_data_plane.envoy.config.rbac.v3 import PermissionSet

    return PermissionSet(rules=list(permissions))


def _authenticated(spiffe: str) -> Any:
    from envoy_data_plane.envoy.config.rbac.v3 import PrincipalAuthenticated

    return PrincipalAuthenticated(principal_name=StringMatcher(exact=spiffe))


def _access_log(fields: Mapping[str, str] = ACCESS_LOG_FORMAT) -> list[EnvoyAccessLog]:
    fmt = SubstitutionFormatString(json_format=Struct.from_dict(dict(fields)))
    return [EnvoyAccessLog(name="envoy.access_loggers.stdout", typed_config=PbAny.pack(StdoutAccessLog(log_format=fmt)))]


OTLP_CLUSTER = "otel_collector"
DEFAULT_OTLP_ENDPOINT = "127.0.0.1:4317"  # the standard OTLP/gRPC port of a local collector


def _hcm(name: str, routes: list[Route], http_filters: list[HttpFilter], service: str = "", *,
         forward_identity: bool = False, router: Router | None = None) -> HttpConnectionManager:
    manager = HttpConnectionManager(
        stat_prefix=name, codec_type=HttpConnectionManagerCodecType.AUTO,
        http2_protocol_options=Http2ProtocolOptions(),
        route_config=RouteConfiguration(name=name, virtual_hosts=[VirtualHost(name=name, domains=["*"], routes=routes)]),
        http_filters=[*http_filters, HttpFilter(name="envoy.filters.http.router",
                                                typed_config=PbAny.pack(router or Router()))],
        access_log=_access_log(), generate_request_id=True,
        # W3C trace context: the OpenTelemetry tracer continues an incoming `traceparent` or starts a trace
        # at this edge, and sends `traceparent` (its own span as the parent) to the upstream. Spans go to the
        # OTLP collector cluster (Envoy drops them when none listens; the context propagates regardless).
        tracing=HttpConnectionManagerTracing(provider=TracingHttp(
            name="envoy.tracers.opentelemetry",
            typed_config=PbAny.pack(OpenTelemetryConfig(
                service_name=f"sidecar-{service or name}",
                grpc_service=GrpcService(envoy_grpc=GrpcServiceEnvoyGrpc(cluster_name=OTLP_CLUSTER)))))))
    if forward_identity:
        # Any x-forwarded-client-cert a caller sent is dropped; the upstream gets one naming the verified
        # peer's SPIFFE URI (none without a client certificate), so the service may trust it.
        manager.forward_client_cert_details = HttpConnectionManagerForwardClientCertDetails.SANITIZE_SET
        manager.set_current_client_cert_details = HttpConnectionManagerSetCurrentClientCertDetails(uri=True)
    return manager


def _hcm_filter(manager: HttpConnectionManager) -> Filter:
    return Filter(name="envoy.filters.network.http_connection_manager", typed_config=PbAny.pack(manager))


HTTP_CLUSTER = "local_http"
# No byte may flow for a while in a streamed generation's prefill, and none at all until a non-streamed
# one ends: an idle stream is cut only after this long (Envoy's default is 5 minutes).
HTTP_STREAM_IDLE_TIMEOUT_S = 3600.0
HTTP_OPEN_PATHS = ("/health", "/ready")  # liveness and readiness need no credentials
HTTP_BEARER_REFUSAL = json.dumps({"error": {
    "message": "missing or malformed credentials: send the header 'authorization: Bearer <API key or JWT>'",
    "type": "invalid_request_error", "param": None, "code": "invalid_api_key"}})
HTTP_ACCESS_LOG_FORMAT = {
    "method": "%REQ(:METHOD)%", "path": "%REQ(:PATH)%", "status": "%RESPONSE_CODE%", "duration_ms": "%DURATION%",
    "bytes_in": "%BYTES_RECEIVED%", "bytes_out": "%BYTES_SENT%", "peer": "%DOWNSTREAM_REMOTE_ADDRESS%",
    "traceparent": "%REQ(TRACEPARENT)%", "request_id": "%REQ(X-REQUEST-ID)%", "upstream": "%UPSTREAM_HOST%",
    "flags": "%RESPONSE_FLAGS%",
}


def _http_edge(policy: Policy, service: str, certs_dir: Path, address: str) -> Listener:
    """The public HTTPS listener in front of the service's HTTP API (the router's OpenAI-compatible API):
    TLS with the service's certificate (file SDS, renewed like the gRPC listener's), no client certificate,
    HTTP/1.1 or h2 from clients, plain HTTP/1.1 to the service. Streams pass through unbuffered (no buffer
    or compression filter; the router filter forwards each chunk as it comes), with no route timeout and
    a long idle timeout; a client that goes away resets the upstream request, so the service sees the
    disconnect. `require_bearer` answers a call to `/v1/...` without `Bearer <token>` with Envoy's own 401
    in OpenAI's error shape."""
    routes: list[Route] = []
    if policy.services[service].require_bearer:
        not_bearer = HeaderMatcher(name="authorization", invert_match=True, treat_missing_header_as_empty=True,
                                   string_match=StringMatcher(safe_regex=RegexMatcher(regex=BEARER_REGEX)))
        routes.append(Route(
            name="require-bearer:/v1/", match=RouteMatch(prefix="/v1/", headers=[not_bearer]),
            direct_response=DirectResponseAction(status=401, body=DataSource(inline_string=HTTP_BEARER_REFUSAL)),
            response_headers_to_add=[HeaderValueOption(header=HeaderValue(key="content-type",
                                                                            value="application/json"))]))
    # timeout 0: no route timeout (a generation takes as long as it takes; the router bounds it).
    routes.append(Route(name="http", match=RouteMatch(prefix="/"),
                        route=RouteAction(cluster=HTTP_CLUSTER, timeout=_seconds(0))))
    manager = _hcm("http", routes, [], service, router=Router(suppress_envoy_headers=True))
    manager.codec_type = HttpConnectionManagerCodecType.AUTO
    manager.stream_idle_timeout = _seconds(HTTP_STREAM_IDLE_TIMEOUT_S)
    manager.request_timeout = _seconds(0)
    manager.use_remote_address = True  # x-forwarded-for is the real client; clients' x-envoy-* are dropped
    manager.preserve_external_request_id = True  # a caller's x-request-id is kept (the router checks it)
    manager.server_header_transformation = HttpConnectionManagerServerHeaderTransformation.PASS_THROUGH
    manager.forward_client_cert_details = HttpConnectionManagerForwardClientCertDetails.SANITIZE
    manager.access_log = _access_log(HTTP_ACCESS_LOG_FORMAT)
    tls = _common_tls(certs_dir, service, None, None)
    tls.validation_context = None  # clients of the public API present no certificate
    tls.alpn_protocols = ["h2", "http/1.1"]
    downstream = DownstreamTlsContext(common_tls_context=tls, require_client_certificate=False)
    return Listener(name="http", address=_socket(address), filter_chains=[FilterChain(
        filters=[_hcm_filter(manager)],
        transport_socket=TransportSocket(name="envoy.transport_sockets.tls", typed_config=PbAny.pack(downstream)))])


def _rate_limit_filter() -> HttpFilter:
    return HttpFilter(name="envoy.filters.http.local_ratelimit",
                      typed_config=PbAny.pack(LocalRateLimit(stat_prefix="local_ratelimit")))


def _cluster(name: str, addresses: Sequence[str], policy: Policy | None, service_policy_name: str | None,
             transport: TransportSocket | None) -> Cluster:
    protocol = HttpProtocolOptions(explicit_http_config=HttpProtocolOptionsExplicitHttpConfig(
        http2_protocol_options=Http2ProtocolOptions()))
    cluster = Cluster(
        name=name, type=ClusterDiscoveryType.STATIC, connect_timeout=_seconds(1), lb_policy=ClusterLbPolicy.ROUND_ROBIN,
        load_assignment=ClusterLoadAssignment(cluster_name=name, endpoints=[LocalityLbEndpoints(lb_endpoints=[
            LbEndpoint(endpoint=Endpoint(address=_socket(a))) for a in addresses])]),
        typed_extension_protocol_options={HTTP2_OPTIONS_KEY: PbAny.pack(protocol)},
        transport_socket=transport)
    if policy is not None and service_policy_name is not None:
        sp = policy.services[service_policy_name]
        cluster.circuit_breakers = CircuitBreakers(thresholds=[CircuitBreakersThresholds(
            max_requests=sp.max_concurrent, max_pending_requests=sp.max_concurrent, max_connections=sp.max_concurrent,
            retry_budget=CircuitBreakersThresholdsRetryBudget(
                budget_percent=Percent(value=sp.retry_budget.ratio * 100.0),
                min_retry_concurrency=max(1, int(sp.retry_budget.min_per_s))))])
        cluster.outlier_detection = OutlierDetection(
            consecutive_5xx=sp.outlier.consecutive_failures,
            consecutive_gateway_failure=sp.outlier.consecutive_failures,
            enforcing_consecutive_gateway_failure=100,
            split_external_local_origin_errors=True,
            consecutive_local_origin_failure=sp.outlier.consecutive_failures,
            base_ejection_time=_seconds(sp.outlier.base_ejection_s),
            max_ejection_percent=sp.outlier.max_ejection_percent,
            interval=_seconds(min(10.0, sp.outlier.base_ejection_s)))
    return cluster


def _http_cluster(addresses: Sequence[str]) -> Cluster:
    """The service's HTTP port: plain HTTP/1.1 on loopback, one connection per request in flight."""
    cluster = Cluster(
        name=HTTP_CLUSTER, type=ClusterDiscoveryType.STATIC, connect_timeout=_seconds(1),
        lb_policy=ClusterLbPolicy.ROUND_ROBIN,
        load_assignment=ClusterLoadAssignment(cluster_name=HTTP_CLUSTER, endpoints=[LocalityLbEndpoints(
            lb_endpoints=[LbEndpoint(endpoint=Endpoint(address=_socket(a))) for a in addresses])]))
    if len(addresses) > 1:
        _least_request(cluster, HealthCheck(tcp_health_check=HealthCheckTcpHealthCheck(), **_HEALTH_TIMING))
    return cluster


# Active health checks of the service's copies: every half second, one failure leaves a copy out, one
# success brings it back.
_HEALTH_TIMING: dict[str, Any] = {"timeout": _seconds(1), "interval": _seconds(0.5), "unhealthy_threshold": 1,
                                  "healthy_threshold": 1}


def _least_request(cluster: Cluster, check: HealthCheck) -> None:
    """Several copies of the local service: the one with the fewest requests in flight, if healthy."""
    cluster.lb_policy = ClusterLbPolicy.LEAST_REQUEST
    cluster.health_checks = [check]


def _split(addresses: str) -> list[str]:
    return [a.strip() for a in addresses.split(",") if a.strip()]


def render_bootstrap(policy: Policy, service: str, *, certs_dir: Path, upstream: str,
                     peers: Mapping[str, Sequence[str]], ports: EnvoyPorts, host: str = "127.0.0.1",
                     otlp_endpoint: str = DEFAULT_OTLP_ENDPOINT, http_upstream: str = "") -> dict[str, Any]:
    """The Envoy bootstrap for `service`'s sidecar, as the JSON-shaped dict Envoy reads. With `ports.http`
    and `http_upstream` (the service's plain HTTP address) it also fronts the service's HTTP API. Either
    address may name several copies of the service, comma-separated."""
    if (ports.http is None) != (not http_upstream):
        raise ValueError("an HTTP listener needs both its port and the service's HTTP address (http_upstream)")
    if service not in policy.services:
        raise PolicyError(f"services: no entry for {service!r} (known: {', '.join(policy.services)})")
    own = policy.services[service]
    inbound_filters: list[HttpFilter] = []
    if not own.public:
        inbound_filters.append(HttpFilter(name="envoy.filters.http.rbac", typed_config=PbAny.pack(_rbac(policy, service))))
    inbound_routes = _bearer_refusals(policy, service) if own.require_bearer else []
    inbound_routes += _routes_for(policy, service, "local", retries=False)
    if any(policy.route_for(m).rate_limit for m in _methods_of(policy, service)):
        inbound_filters.append(_rate_limit_filter())
    for infra in ("/grpc.health.v1.Health/", "/grpc.reflection."):
        inbound_routes.append(Route(name=f"infra:{infra}", match=RouteMatch(prefix=infra),
                                    route=RouteAction(cluster="local", timeout=_seconds(0))))
    downstream = DownstreamTlsContext(
        common_tls_context=_common_tls(certs_dir, service, f"spiffe://{policy.trust_domain}/", None),
        require_client_certificate=not own.public)
    if own.public:
        assert downstream.common_tls_context is not None
        downstream.common_tls_context.validation_context = CertificateValidationContext(
            trusted_ca=DataSource(filename=str(certs_dir / "ca.pem")))
    listeners = [Listener(
        name="inbound", address=_socket(f"{host}:{ports.inbound}"),
        filter_chains=[FilterChain(
            filters=[_hcm_filter(_hcm("inbound", inbound_routes, inbound_filters, service,
                                             forward_identity=True))],
            transport_socket=TransportSocket(name="envoy.transport_sockets.tls", typed_config=PbAny.pack(downstream)))])]
    local = _cluster("local", _split(upstream), None, None, None)
    if len(_split(upstream)) > 1:
        _least_request(local, HealthCheck(grpc_health_check=HealthCheckGrpcHealthCheck(), **_HEALTH_TIMING))
    clusters = [local, _cluster(OTLP_CLUSTER, [otlp_endpoint], None, None, None)]
    if ports.http is not None:
        listeners.append(_http_edge(policy, service, certs_dir, f"{host}:{ports.http}"))
        clusters.append(_http_cluster(_split(http_upstream)))
    if ports.outbound is not None and peers:
        outbound_routes: list[Route] = []
        for peer, addresses in peers.items():
            if peer not in policy.services:
                raise PolicyError(f"peer {peer!r} is not a service of the mesh policy ({', '.join(policy.services)})")
            outbound_routes.extend(_routes_for(policy, peer, peer, retries=True))
            upstream_tls = UpstreamTlsContext(
                common_tls_context=_common_tls(certs_dir, service, None, policy.spiffe_id(peer)), sni=peer)
            clusters.append(_cluster(peer, addresses, policy, peer, TransportSocket(
                name="envoy.transport_sockets.tls", typed_config=PbAny.pack(upstream_tls))))
        if len(peers) == 1:  # health and reflection belong to no one service: with one peer they go to it
            only = next(iter(peers))
            for infra in ("/grpc.health.v1.Health/", "/grpc.reflection."):
                outbound_routes.append(Route(name=f"infra:{infra}", match=RouteMatch(prefix=infra),
                                             route=RouteAction(cluster=only, timeout=_seconds(10))))
        listeners.append(Listener(name="outbound", address=_socket(f"{host}:{ports.outbound}"),
                                  filter_chains=[FilterChain(filters=[_hcm_filter(_hcm("outbound", outbound_routes, [],
                                                                                         service))])]))
    bootstrap = Bootstrap(
        node=Node(id=f"{service}-sidecar", cluster=service),  # file-based SDS needs a node identity
        admin=Admin(address=_socket(f"127.0.0.1:{ports.admin}")),
        static_resources=BootstrapStaticResources(listeners=listeners, clusters=clusters),
    )
    return _fix_keys(bootstrap.to_dict(casing=betterproto2.Casing.SNAKE))


def _fix_keys(value: Any) -> Any:
    """betterproto's snake_case turns `consecutive_5xx` into `consecutive_5_xx`; Envoy wants the proto name."""
    if isinstance(value, dict):
        return {k.replace("_5_xx", "_5xx"): _fix_keys(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_fix_keys(v) for v in value]
    return value


def render_to_file(policy_path: Path, service: str, output: Path, *, certs_dir: Path, upstream: str,
                   peers: Mapping[str, Sequence[str]], ports: EnvoyPorts,
                   otlp_endpoint: str = DEFAULT_OTLP_ENDPOINT, http_upstream: str = "") -> Path:
    doc = render_bootstrap(load_policy(policy_path), service, certs_dir=certs_dir, upstream=upstream, peers=peers,
                           ports=ports, otlp_endpoint=otlp_endpoint, http_upstream=http_upstream)
    output.parent.mkdir(parents=True, exist_ok=True)
    header = (f"# Envoy v3 bootstrap for the {service} sidecar, rendered from {policy_path} by "
              f"`autoglm sidecar render-envoy`. Do not edit: re-render.\n")
    output.write_text(header + yaml.safe_dump(doc, sort_keys=False))
    return output
