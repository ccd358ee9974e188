"""The byte-forwarding proxy: a grpc.aio generic handler that forwards any method without
deserialising it. One `Proxy` serves one listener (inbound: mTLS from peers to the local service;
outbound: plaintext from the local service to its peers' sidecars over mTLS).

Per call it resolves a precomputed plan (route, cluster, call type), checks authorization (inbound),
the rate and concurrency limits, sets the upstream deadline to the smaller of the caller's deadline and
the route timeout, injects or propagates trace context, sets `x-forwarded-client-cert` to the verified
peer identity (inbound; a caller's own copy is never forwarded), forwards, retries what the route allows
(outbound; never a stream that has delivered a message), feeds the breaker and outlier detector,
and writes one access-log line, one span and the metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import grpc
from opentelemetry import trace
from opentelemetry.trace import (
    NonRecordingSpan,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
    TraceState,
)

from sidecar import certs
from sidecar.access_log import AccessLog
from sidecar.methods import CallType, call_type
from sidecar.metrics import SidecarMetrics
from sidecar.policy import Policy, Route
from sidecar.ratelimit import CallerBuckets, bearer_token, caller_key
from sidecar.retry import backoff_delay
from sidecar.tracectx import (
    FORWARDED_CLIENT_CERT,
    REQUEST_ID,
    TRACEPARENT,
    TRACESTATE,
    Incoming,
    new_span_id,
    new_trace_id,
    parse_traceparent,
)
from sidecar.upstream import Cluster

# Status codes that count as the upstream failing (breaker, outlier detection).
FAILURE_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                           grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.DATA_LOSS})


# Call kinds the proxy retries (their calls count in the retry budget's requests in flight).
RETRIED_KINDS = frozenset({CallType.UNARY_UNARY, CallType.UNARY_STREAM})

# Services every server offers; on an outbound listener with one peer they are routed to that peer.
INFRA_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")


@dataclass
class Plan:
    """Everything a call to one method needs, resolved once per method and policy version."""

    method: str
    kind: CallType
    route: Route
    cluster: Cluster | None
    target: str
    retry_on: frozenset[grpc.StatusCode]
    limiter: CallerBuckets | None  # per caller (see sidecar.ratelimit)
    label_requests: Callable[[str], Any]
    latency: Any
    span_name: str
    span_kind: SpanKind
    span_attributes: dict[str, Any]
    public: bool  # inbound to a public service: no authorization
    require_bearer: bool  # inbound to a service that wants `authorization: Bearer <token>` on its own methods
    allowed_peers: dict[str, bool]


def _never_reached(err: grpc.aio.AioRpcError) -> bool:
    """grpc's own answer when no connection to the upstream could be made (so the call never left)."""
    return err.code() is grpc.StatusCode.UNAVAILABLE and (err.details() or "").startswith("failed to connect")


class ProxyFailure(Exception):
    """A call the proxy itself refuses or gives up on (answered with `code` and `details`)."""

    def __init__(self, code: grpc.StatusCode, details: str, trailing: Any = None) -> None:
        super().__init__(details)
        self.code, self.details, self.trailing = code, details, trailing


class CallState:
    """Per-call bookkeeping, filled in as the call goes."""

    __slots__ = ("attempts", "authorization", "bytes_in", "bytes_out", "call", "code", "details", "held", "metadata",
                 "peer", "request_id", "span", "started", "trace_id", "upstream")

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.attempts = 0
        self.bytes_in = 0
        self.bytes_out = 0
        self.code = grpc.StatusCode.OK
        self.details = ""
        self.peer = ""
        self.trace_id = ""
        self.request_id = ""
        self.upstream = ""
        self.authorization = ""
        self.span: Any = None
        self.metadata: list[Any] = []  # forwarded upstream
        self.call: Any = None  # the upstream call in progress
        self.held = -1  # the endpoint counted as serving this call (least-request clusters), -1: none


class Proxy(grpc.GenericRpcHandler):
    def __init__(self, *, direction: str, service: str, policy: Policy, clusters: dict[str, Cluster],
                 metrics: SidecarMetrics, access_log: AccessLog, sleep: Callable[[float], Any] = asyncio.sleep
                 ) -> None:
        self.direction = direction
        self.inbound = direction == "inbound"
        self.local_service = service
        self.clusters = clusters
        self.metrics = metrics
        self.access_log = access_log
        self._sleep = sleep
        self._tracer = trace.get_tracer("autoglm.sidecar")
        self._handlers: dict[str, grpc.RpcMethodHandler] = {}
        self._plans: dict[str, Plan] = {}
        self.policy = policy
        self._own_identity = policy.spiffe_id(service)  # `By=` of the x-forwarded-client-cert it sets

    # --- policy -----------------------------------------------------------------------------------
    def set_policy(self, policy: Policy) -> None:
        """New calls use `policy`; calls in flight keep the plan they started with."""
        self.policy = policy
        self._own_identity = policy.spiffe_id(self.local_service)
        self._plans = {}
        for name, cluster in self.clusters.items():
            cluster.update_policy(policy.services.get(name))

    def plan(self, method: str) -> Plan:
        found = self._plans.get(method)
        if found is not None:
            return found
        policy = self.policy
        route = policy.route_for(method)
        if self.inbound:
            target = self.local_service
            cluster = self.clusters.get("local")
        else:
            target = policy.cluster_for(method) or ""
            if not target and method.startswith(INFRA_PREFIXES) and len(self.clusters) == 1:
                # Health and reflection belong to no one service: with a single peer they go to it.
                target = next(iter(self.clusters))
            cluster = self.clusters.get(target)
        limit = route.rate_limit
        limiter = CallerBuckets(limit.rps, limit.burst, limit.max_callers) if limit else None
        own = policy.services.get(self.local_service)
        require_bearer = bool(self.inbound and own is not None and own.require_bearer
                              and method.lstrip("/").split("/", 1)[0] in own.grpc_services)
        retry_on = frozenset(getattr(grpc.StatusCode, c) for c in route.retries.retry_on)
        requests = self.metrics.requests
        direction = self.direction
        labels: dict[str, Any] = {}

        def label_requests(code: str) -> Any:
            child = labels.get(code)
            if child is None:
                child = labels[code] = requests.labels(direction, method, code)
            return child

        found = self._plans[method] = Plan(
            method=method, kind=call_type(method), route=route, cluster=cluster, target=target,
            retry_on=retry_on, limiter=limiter, label_requests=label_requests,
            latency=self.metrics.latency.labels(direction, method),
            span_name=f"sidecar.{direction} {method.lstrip('/')}",
            span_kind=SpanKind.SERVER if self.inbound else SpanKind.CLIENT,
            span_attributes={"rpc.system": "grpc", "rpc.method": method, "sidecar.service": self.local_service},
            public=own is not None and own.public, require_bearer=require_bearer, allowed_peers={})
        return found

    # --- grpc.GenericRpcHandler -------------------------------------------------------------------
    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        method: str = handler_call_details.method  # type: ignore[attr-defined]
        handler = self._handlers.get(method)
        if handler is None:
            kind = call_type(method)
            if kind is CallType.UNARY_UNARY:
                handler = grpc.unary_unary_rpc_method_handler(self._unary(method))
            elif kind is CallType.UNARY_STREAM:
                handler = grpc.unary_stream_rpc_method_handler(self._unary_stream(method))
            elif kind is CallType.STREAM_UNARY:
                handler = grpc.stream_unary_rpc_method_handler(self._stream_unary(method))
            else:
                handler = grpc.stream_stream_rpc_method_handler(self._stream_stream(method))
            self._handlers[method] = handler
        return handler

    # --- the parts every call shares --------------------------------------------------------------
    def _peer_identity(self, context: grpc.aio.ServicerContext) -> str:
        auth = context.auth_context()
        spiffe = auth.get("peer_spiffe_id")
        if spiffe:
            return spiffe[0].decode()
        pem = auth.get("x509_pem_cert")
        if pem:
            sans = certs.uri_sans(pem[0])
            return sans[0] if sans else ""
        return ""

    def _admit(self, plan: Plan, context: grpc.aio.ServicerContext, state: CallState) -> None:
        """Mesh authorization, the bearer check, cluster presence, the caller's rate limit and the concurrency
        limit; raises ProxyFailure."""
        if self.inbound:
            if not plan.public:
                # Decisions are cached per plan (i.e. per method and policy version) and caller identity.
                allowed = plan.allowed_peers.get(state.peer)
                if allowed is None:
                    source = self.policy.service_of_identity(state.peer) if state.peer else None
                    allowed = self.policy.allowed(source, self.local_service, plan.method)
                    if len(plan.allowed_peers) < 1024:
                        plan.allowed_peers[state.peer] = allowed
                if not allowed:
                    self.metrics.denied.labels(state.peer or "none", plan.method).inc()
                    who = state.peer or "a caller without a mesh identity"
                    raise ProxyFailure(grpc.StatusCode.PERMISSION_DENIED,
                                       f"{who} may not call {plan.method} on {self.local_service} (mesh policy)")
        if plan.cluster is None:
            raise ProxyFailure(grpc.StatusCode.UNIMPLEMENTED,
                               f"the {self.local_service} sidecar has no route for {plan.method}: no service in the "
                               f"mesh policy lists {plan.method.lstrip('/').split('/', 1)[0]}")
        if plan.require_bearer or plan.limiter is not None:
            token = bearer_token(state.authorization) if state.authorization else None
            if token is None and plan.require_bearer:
                # Refused here, before the service spends anything on it (a flood of these costs it nothing).
                raise ProxyFailure(grpc.StatusCode.UNAUTHENTICATED,
                                   "missing or malformed credentials: send metadata "
                                   "'authorization: Bearer <API key or JWT>'")
            if plan.limiter is not None and not plan.limiter.try_take(caller_key(token, state.peer, context.peer())):
                raise ProxyFailure(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                   f"rate limit of route {plan.route.name} exceeded for this caller; retry later")
        if plan.cluster.active >= plan.cluster.max_concurrent:
            raise ProxyFailure(grpc.StatusCode.UNAVAILABLE,
                               f"{plan.cluster.name}: {plan.cluster.max_concurrent} calls already in flight "
                               f"(concurrency limit); retry later")

    def _exporting(self) -> bool:
        """Does any span processor take spans? An SDK provider without processors (no exporter configured)
        drops every span, so the proxy then makes the traceparent itself and skips the span."""
        provider = trace.get_tracer_provider()
        processors = getattr(getattr(provider, "_active_span_processor", None), "_span_processors", None)
        return processors is None or bool(processors)

    def _outgoing(self, context: grpc.aio.ServicerContext, state: CallState, plan: Plan) -> list[Any]:
        """Forwarded metadata with trace context and request id; opens the call's span (when spans go anywhere)."""
        incoming = Incoming(context.invocation_metadata())
        metadata = incoming.forward
        parent = parse_traceparent(incoming.traceparent) if incoming.traceparent else None
        if not self._exporting():
            if parent is not None:
                state.trace_id = parent[0]
                metadata.append((TRACEPARENT, f"00-{parent[0]}-{new_span_id()}-{parent[2]}"))
            else:
                state.trace_id = new_trace_id()
                metadata.append((TRACEPARENT, f"00-{state.trace_id}-{new_span_id()}-01"))
        else:
            otel_parent = None
            if parent is not None:
                trace_state = TraceState.from_header([incoming.tracestate]) if incoming.tracestate else None
                otel_parent = trace.set_span_in_context(NonRecordingSpan(SpanContext(
                    trace_id=int(parent[0], 16), span_id=int(parent[1], 16), is_remote=True,
                    trace_flags=TraceFlags(int(parent[2], 16)), trace_state=trace_state)))
            span = self._tracer.start_span(plan.span_name, context=otel_parent, kind=plan.span_kind,
                                           attributes=plan.span_attributes)
            ctx = span.get_span_context()
            if ctx.is_valid:
                state.trace_id = format(ctx.trace_id, "032x")
                metadata.append((TRACEPARENT, f"00-{state.trace_id}-{ctx.span_id:016x}-{int(ctx.trace_flags):02x}"))
            elif parent is not None:
                state.trace_id = parent[0]
                metadata.append((TRACEPARENT, incoming.traceparent))
            else:
                state.trace_id = new_trace_id()
                metadata.append((TRACEPARENT, f"00-{state.trace_id}-{new_span_id()}-01"))
            state.span = span
        if incoming.tracestate:
            metadata.append((TRACESTATE, incoming.tracestate))
        state.request_id = incoming.request_id or new_trace_id()
        state.authorization = incoming.authorization
        metadata.append((REQUEST_ID, state.request_id))
        if self.inbound:
            # The caller's own copy was dropped (tracectx): the service may trust this one, as Envoy's
            # SANITIZE_SET makes it (no header at all for a caller without a client certificate).
            state.peer = self._peer_identity(context)
            if state.peer:
                metadata.append((FORWARDED_CLIENT_CERT, f"By={self._own_identity};URI={state.peer}"))
        return metadata

    def _deadline(self, context: grpc.aio.ServicerContext, route: Route) -> float | None:
        """Absolute monotonic deadline: the smaller of the caller's deadline and the route timeout."""
        remaining = context.time_remaining()
        timeout = route.timeout_s
        if remaining is not None and (timeout is None or remaining < timeout):
            timeout = remaining
        return None if timeout is None else time.monotonic() + timeout

    def _finish(self, plan: Plan, state: CallState) -> None:
        """The call's metrics, span and access-log line: timed now, written just after the answer has been
        handed to grpc (the next turn of the event loop), so none of it sits between the two."""
        asyncio.get_running_loop().call_soon(self._report, plan, state, time.perf_counter() - state.started)

    def _report(self, plan: Plan, state: CallState, elapsed: float) -> None:
        code_name = state.code.name
        plan.label_requests(code_name).inc()
        plan.latency.observe(elapsed)
        span = state.span
        if span is not None:
            span.set_attribute("rpc.grpc.status_code", state.code.value[0])
            if state.peer:
                span.set_attribute("sidecar.peer", state.peer)
            if state.code is not grpc.StatusCode.OK:
                span.set_status(Status(StatusCode.ERROR, code_name))
            span.end()
        self.access_log.record(method=plan.method, status=code_name, duration_ms=elapsed * 1000.0,
                               bytes_in=state.bytes_in, bytes_out=state.bytes_out, peer=state.peer,
                               trace_id=state.trace_id, request_id=state.request_id, upstream=state.upstream,
                               attempts=state.attempts, message=state.details)

    async def _fail(self, context: grpc.aio.ServicerContext, state: CallState, failure: ProxyFailure) -> None:
        state.code, state.details = failure.code, failure.details
        await context.abort(failure.code, failure.details, failure.trailing or ())

    def _record(self, cluster: Cluster, index: int, code: grpc.StatusCode) -> None:
        """One attempt's outcome, for outlier detection of that endpoint."""
        if cluster.outlier is not None and cluster.outlier.record(index, code not in FAILURE_CODES):
            self.metrics.ejections.labels(cluster.name, cluster.outlier.endpoints[index].address).inc()

    def _choose(self, cluster: Cluster, state: CallState, first: bool) -> int:
        """Pick an endpoint. The breaker is asked once per call (retries belong to the call it admitted)."""
        breaker = cluster.breaker
        if first and breaker is not None and not breaker.allow():
            raise ProxyFailure(grpc.StatusCode.UNAVAILABLE,
                               f"circuit breaker for {cluster.name} is {breaker.state.value}: failing fast")
        index = cluster.pick()
        if cluster.least_request:
            if state.held >= 0:
                cluster.release(state.held)
            cluster.take(index)
            state.held = index
        state.upstream = cluster.endpoints[index].address
        state.attempts += 1
        return index

    @staticmethod
    def _breaker_outcome(cluster: Cluster | None, state: CallState) -> None:
        """The call's final outcome feeds the breaker (only calls that reached an upstream)."""
        if cluster is not None and cluster.breaker is not None and state.attempts:
            cluster.breaker.record(state.code not in FAILURE_CODES)

    @staticmethod
    def _elsewhere(cluster: Cluster, err: grpc.aio.AioRpcError, index: int, attempt: int) -> bool:
        """A copy of the local service that refuses connections (stopped, before its health check says
        so) never saw the call: it goes to another copy (no retry budget, no back-off), and the refusing
        copy is left out until its health check passes again."""
        if not cluster.least_request or attempt >= len(cluster.endpoints) or not _never_reached(err):
            return False
        cluster.healthy[index] = False
        return True

    def _may_retry(self, plan: Plan, code: grpc.StatusCode, attempt: int, deadline: float | None) -> bool:
        cluster = plan.cluster
        if cluster is None or cluster.budget is None or code not in plan.retry_on:
            return False
        if attempt >= plan.route.retries.max_attempts:
            return False
        if deadline is not None and deadline - time.monotonic() <= 0:
            return False
        if not cluster.budget.try_acquire():
            self.metrics.retry_denied.labels(cluster.name).inc()
            return False
        self.metrics.retries.labels(cluster.name).inc()
        return True

    def _attempt_timeout(self, plan: Plan, deadline: float | None, attempt_retries: bool) -> float | None:
        per_try = plan.route.retries.per_try_timeout_s if attempt_retries else None
        if deadline is None:
            return per_try
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise ProxyFailure(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded before the upstream call")
        return remaining if per_try is None or remaining < per_try else per_try

    @staticmethod
    def _upstream_failure(err: grpc.aio.AioRpcError) -> ProxyFailure:
        return ProxyFailure(err.code(), err.details() or "", tuple(err.trailing_metadata() or ()))

    # --- the scope every call runs in ---------------------------------------------------------------
    @contextlib.asynccontextmanager
    async def _call_scope(self, plan: Plan, context: grpc.aio.ServicerContext, state: CallState
                          ) -> AsyncIterator[Cluster]:
        """What every kind of call shares, around the part that forwards it: trace context (and the span),
        admission, the concurrency count and (for retried kinds) the retry budget's request count; a refusal
        or upstream failure answered with its code; on the way out, the upstream call cancelled if still
        running, the breaker fed, and the metrics, span and access-log line written."""
        cluster = plan.cluster
        counted = False
        budget = None
        try:
            state.metadata = self._outgoing(context, state, plan)
            self._admit(plan, context, state)
            assert cluster is not None
            cluster.active += 1
            counted = True
            if plan.kind in RETRIED_KINDS and cluster.budget is not None:
                budget = cluster.budget
                budget.request_started()
            yield cluster
        except ProxyFailure as failure:
            await self._fail(context, state, failure)  # abort: raises grpc's abort exception
        except (asyncio.CancelledError, GeneratorExit):
            state.code = grpc.StatusCode.CANCELLED
            raise
        finally:
            call = state.call
            if call is not None and not call.done():
                call.cancel()
            if counted:
                assert cluster is not None
                cluster.active -= 1
                if state.held >= 0:
                    cluster.release(state.held)
            if budget is not None:
                budget.request_finished()
            self._breaker_outcome(cluster, state)
            self._finish(plan, state)

    # --- unary → unary: the fast path; retried while the route and the budget allow -------------------
    def _unary(self, method: str) -> Callable[..., Any]:
        async def handle(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            plan = self._plans.get(method) or self.plan(method)
            state = CallState()
            state.bytes_in = len(request)
            async with self._call_scope(plan, context, state) as cluster:
                response = await self._unary_attempts(plan, cluster, request, context, state)
                state.bytes_out = len(response)
                return response
            raise AssertionError("unreachable: a refused call is aborted")

        return handle

    async def _unary_attempts(self, plan: Plan, cluster: Cluster, request: bytes,
                              context: grpc.aio.ServicerContext, state: CallState) -> bytes:
        deadline = self._deadline(context, plan.route)
        retries = cluster.budget is not None
        attempt = 0
        holding = False  # a retry holds a slot of the retry budget until its attempt has finished
        try:
            while True:
                attempt += 1
                index = self._choose(cluster, state, attempt == 1)
                call = cluster.endpoints[index].callable(plan.method, CallType.UNARY_UNARY)(
                    request, timeout=self._attempt_timeout(plan, deadline, retries), metadata=state.metadata)
                try:
                    response: bytes = await call
                    self._record(cluster, index, grpc.StatusCode.OK)
                    return response
                except grpc.aio.AioRpcError as err:
                    code = err.code()
                    self._record(cluster, index, code)
                    if holding:
                        assert cluster.budget is not None
                        cluster.budget.release()
                        holding = False
                    if self._elsewhere(cluster, err, index, attempt):
                        continue
                    if not self._may_retry(plan, code, attempt, deadline):
                        if code is grpc.StatusCode.DEADLINE_EXCEEDED and deadline is not None \
                                and deadline - time.monotonic() <= 0:
                            raise ProxyFailure(code, f"deadline exceeded calling {plan.method}") from None
                        raise self._upstream_failure(err) from None
                    holding = True
                    await self._sleep(backoff_delay(attempt, plan.route.retries.backoff))
                except asyncio.CancelledError:
                    call.cancel()
                    raise
        finally:
            if holding:
                assert cluster.budget is not None
                cluster.budget.release()

    # --- unary → stream: retried only while no message has been delivered -----------------------------
    def _unary_stream(self, method: str) -> Callable[..., Any]:
        async def handle(request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
            plan = self._plans.get(method) or self.plan(method)
            state = CallState()
            state.bytes_in = len(request)
            async with self._call_scope(plan, context, state) as cluster:
                deadline = self._deadline(context, plan.route)
                retries = cluster.budget is not None
                attempt = 0
                holding = False  # a retry holds a slot of the retry budget until its attempt has finished
                try:
                    while True:
                        attempt += 1
                        index = self._choose(cluster, state, attempt == 1)
                        call = state.call = cluster.endpoints[index].callable(method, CallType.UNARY_STREAM)(
                            request, timeout=self._attempt_timeout(plan, deadline, retries), metadata=state.metadata)
                        delivered = False
                        try:
                            async for message in call:
                                delivered = True
                                state.bytes_out += len(message)
                                yield message
                            self._record(cluster, index, grpc.StatusCode.OK)
                            break
                        except grpc.aio.AioRpcError as err:
                            code = err.code()
                            self._record(cluster, index, code)
                            if holding:
                                assert cluster.budget is not None
                                cluster.budget.release()
                                holding = False
                            if not delivered and self._elsewhere(cluster, err, index, attempt):
                                continue
                            if delivered or not self._may_retry(plan, code, attempt, deadline):
                                raise self._upstream_failure(err) from None
                            holding = True
                            await self._sleep(backoff_delay(attempt, plan.route.retries.backoff))
                finally:
                    if holding:
                        assert cluster.budget is not None
                        cluster.budget.release()

        return handle

    # --- client-streaming and bidirectional: passed through, never retried -------------------------
    async def _count_in(self, requests: AsyncIterator[bytes], state: CallState) -> AsyncIterator[bytes]:
        async for message in requests:
            state.bytes_in += len(message)
            yield message

    def _stream_unary(self, method: str) -> Callable[..., Any]:
        async def handle(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> bytes:
            plan = self._plans.get(method) or self.plan(method)
            state = CallState()
            async with self._call_scope(plan, context, state) as cluster:
                deadline = self._deadline(context, plan.route)
                index = self._choose(cluster, state, True)
                call = state.call = cluster.endpoints[index].callable(method, CallType.STREAM_UNARY)(
                    self._count_in(requests, state), timeout=self._attempt_timeout(plan, deadline, False),
                    metadata=state.metadata)
                try:
                    response: bytes = await call
                except grpc.aio.AioRpcError as err:
                    self._record(cluster, index, err.code())
                    raise self._upstream_failure(err) from None
                self._record(cluster, index, grpc.StatusCode.OK)
                state.bytes_out = len(response)
                return response
            raise AssertionError("unreachable: a refused call is aborted")

        return handle

    def _stream_stream(self, method: str) -> Callable[..., Any]:
        async def handle(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext
                         ) -> AsyncIterator[bytes]:
            plan = self._plans.get(method) or self.plan(method)
            state = CallState()
            async with self._call_scope(plan, context, state) as cluster:
                deadline = self._deadline(context, plan.route)
                index = self._choose(cluster, state, True)
                call = state.call = cluster.endpoints[index].callable(method, CallType.STREAM_STREAM)(
                    self._count_in(requests, state), timeout=self._attempt_timeout(plan, deadline, False),
                    metadata=state.metadata)
                try:
                    async for message in call:
                        state.bytes_out += len(message)
                        yield message
                except grpc.aio.AioRpcError as err:
                    self._record(cluster, index, err.code())
                    raise self._upstream_failure(err) from None
                self._record(cluster, index, grpc.StatusCode.OK)

        return handle
