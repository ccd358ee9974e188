"""The router's composition root: from a RouterConfig it builds the stores under the data dir, the peer
clients (inference, billing) and the ports, and injects them into the gateway's rooms, the admin module
(`admin`) and the jobs; it runs the background tasks (replica monitoring, usage spool replay, retention
purges) and bootstraps the bundled model. Servicers get the parts they name (`servicer.RouterPorts`,
`Admin`), never the stores behind them."""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import structlog

from services.common.errors import DomainError, NotFound, Unauthenticated
from services.common.usage import AlertLevel, Usage
from services.router import metrics
from services.router.admin import Admin
from services.router.admission import PriorityGate
from services.router.auth.api_keys import load_or_create_secret_file
from services.router.auth.authenticator import Authenticator
from services.router.auth.jwt import JwtSettings, JwtVerifier
from services.router.auth.key_store import KeyStore
from services.router.balancer import Balancer
from services.router.billing_client import GrpcBilling
from services.router.billing_operator import BillingOperator
from services.router.cache import ResponseCache
from services.router.canary import CanaryMonitor
from services.router.config import RouterConfig
from services.router.contexts import ContextStore
from services.router.gateway import Gateway, GatewaySettings, validate_tags
from services.router.gateway.plan import effective_class
from services.router.inference_client import GrpcInference
from services.router.input_limits import InputLimits
from services.router.jobs.runner import BatchRunner, RunnerSettings
from services.router.jobs.service import Jobs
from services.router.jobs.store import JobStore
from services.router.leasebook import LeaseBook
from services.router.limits.backends import rate_limit_backend
from services.router.limits.token_bucket import RateLimiter
from services.router.metering import Meter
from services.router.policy import PolicyStore
from services.router.ports import UsageRecord
from services.router.registry import ModelEntry, Registry
from services.router.replica_monitor import ReplicaMonitor
from services.router.retry import RetrySettings
from services.router.spool import SettlementJournal, UsageSpool
from services.router.store import open_stores
from services.router.tasks import TaskKind, TaskSpec
from services.router.types import (
    GenerationRequest,
    Money,
    Principal,
    RequestContext,
    Summary,
)
from services.router.usage_stream import UsageStream
from services.router.workflows.budget import WorkflowBudget
from services.router.workflows.runner import NodeCall, WorkflowRunner, WorkflowSettings
from services.router.workflows.service import Workflows
from services.router.workflows.store import WorkflowStore, owner_id

log = structlog.get_logger(__name__)
DEFAULT_BILLING_TARGET = "127.0.0.1:50061"


def admin_token_of(config: RouterConfig) -> str:
    if config.admin_token:
        return config.admin_token
    if config.admin_token_path:
        path = Path(config.admin_token_path)
        token = path.read_text().strip() if path.is_file() else ""
        if not token:
            raise ValueError(f"router.admin_token_path {path} is missing or empty: put the admin token there "
                             "(or leave the setting empty to use <data_dir>/admin_token)")
        return token
    return load_or_create_secret_file(config.data_dir / "admin_token", text=True).decode()


class RouterApp:
    def __init__(self, config: RouterConfig, status_name: Callable[[DomainError], str] = lambda e: e.reason) -> None:
        self.config = config
        self.input_limits = InputLimits(config.max_prompt_bytes, config.max_request_bytes)
        data = Path(config.data_dir)
        data.mkdir(parents=True, exist_ok=True)
        pepper = load_or_create_secret_file(Path(config.key_pepper_path) if config.key_pepper_path
                                            else data / "key_pepper")
        stores = open_stores(config.database, data, poll_s=config.store_poll_s)
        self._stores = stores
        self.keys = KeyStore(stores.keys, pepper)
        jwt_settings = JwtSettings(
            hs256_secret=config.jwt_hs256_secret.encode(),
            jwks_path=Path(config.jwt_jwks_path) if config.jwt_jwks_path else None,
            tenant_claim=config.jwt_tenant_claim, issuer=config.jwt_issuer, audience=config.jwt_audience,
            leeway_s=config.jwt_leeway_s,
        )
        if jwt_settings.enabled and not (config.jwt_issuer and config.jwt_audience):
            log.warning("jwt_without_issuer_or_audience",
                        hint="set router.jwt_issuer and router.jwt_audience: without them any token signed by a "
                             "trusted key, whatever it was issued for, is accepted")
        self.authenticator = Authenticator(
            self.keys, admin_token_of(config), JwtVerifier(jwt_settings) if jwt_settings.enabled else None
        )
        self.registry = Registry(stores.registry)
        self.policies = PolicyStore(stores.policies)
        self.contexts = ContextStore(stores.contexts, config.context_max_messages, config.context_max_bytes,
                                     config.context_retention_s)
        self.spool = UsageSpool(data / "usage_spool.db")
        self.journal = SettlementJournal(data / "usage_journal.bin")
        # A router instance's leases die with it: a fresh id at each start (the old ones expire at billing).
        # Replicas report it with each finished sequence, so billing knows whose lease bounds its event.
        self.router_id = f"router-{uuid.uuid4().hex[:16]}"
        self.inference = GrpcInference(router_id=self.router_id, dial=config.inference_dial)
        self.billing = GrpcBilling(config.billing_target or DEFAULT_BILLING_TARGET, timeout_s=config.billing_timeout_s)
        self.balancer = Balancer(
            affinity_margin=None if config.affinity_load_margin < 0 else config.affinity_load_margin)
        self.monitor = ReplicaMonitor(self.balancer, self.inference, config.health_interval_s)
        self.leases = LeaseBook(self.billing, self.router_id) if config.billing_leases else None
        # With leases, usage events go to billing in batches over one StreamUsage stream.
        self.usage_stream = UsageStream(self.billing) if config.billing_leases else None
        metrics.watch_leases(self.leases, self.usage_stream)
        self.meter = Meter(self.billing, self.spool, grace_s=config.billing_grace_s,
                           recovery_s=config.billing_recovery_s, batch_wait_s=config.batch_billing_wait_s,
                           max_early_starts_per_tenant=config.early_starts_per_tenant, journal=self.journal,
                           leases=self.leases, stream=self.usage_stream,
                           max_reserves_in_flight=config.billing_reserves_in_flight)
        self.limiter = RateLimiter(rate_limit_backend(config.rate_limit_redis_url,
                                                      fail_open=config.rate_limit_redis_fail_open))
        self.gateway = Gateway(
            registry=self.registry, balancer=self.balancer, inference=self.inference, meter=self.meter,
            limiter=self.limiter,
            cache=ResponseCache(config.cache_max_entries, config.cache_max_bytes, config.cache_ttl_s),
            contexts=self.contexts, policies=self.policies, canary=CanaryMonitor(self.registry),
            gate=PriorityGate(config.max_concurrent, config.max_queued, config.queue_retry_after_s),
            settings=GatewaySettings(default_max_tokens=config.default_max_tokens,
                                     retry=RetrySettings(max_attempts=config.retry_max_attempts)),
        )
        self.job_store = JobStore(stores.jobs)
        self.runner = BatchRunner(
            self.job_store, self._run_batch_item, self._budget_level, status_name,
            RunnerSettings(concurrency=config.batch_concurrency, poll_s=config.batch_poll_s,
                           lease_s=config.batch_lease_s),
        )
        self.jobs = Jobs(self.job_store, self.runner, self.gateway.check_model, validate_tags)
        budget = WorkflowBudget(self.registry, lambda: self.meter.prices, self.billing)
        # Workflows share the jobs' store (its SQLite file, or the one PostgreSQL database).
        self.workflow_store = WorkflowStore(stores.jobs)
        self.workflow_runner = WorkflowRunner(
            self.workflow_store, self._run_workflow_node, self._budget_level, status_name,
            WorkflowSettings(concurrency=config.workflow_concurrency,
                             default_max_concurrency=config.workflow_default_concurrency,
                             max_nodes=config.workflow_max_nodes, poll_s=config.workflow_poll_s,
                             retention_s=config.job_retention_s,
                             purge_interval_s=config.retention_purge_interval_s, lease_s=config.workflow_lease_s),
            owner=owner_id(data),
        )
        self.workflows = Workflows(self.workflow_store, self.workflow_runner, self.gateway.check_model, validate_tags,
                                   effective_class, budget.quote, budget.cover, config.default_max_tokens)
        self.gateway.accountant.observers.append(self._workflow_attempt)
        self.admin = Admin(self.keys, self.registry, self.policies, self.inference, self.healthy_replicas)
        self.billing_operator = BillingOperator(
            config.billing_target or DEFAULT_BILLING_TARGET, config.billing_operator_token,
            Path(config.billing_operator_token_file) if config.billing_operator_token_file else None)
        self._tasks: list[asyncio.Task[None]] = []
        self._purging: asyncio.Future[tuple[int, int]] | None = None

    async def start(self) -> None:
        await self.bootstrap_models()
        for model in self.registry.models():
            for version in model.versions:
                self.monitor.watch(version.replicas)
        self.registry.on_change.append(self._watch_model)
        await self.meter.refresh_prices()
        self.meter.recover_journal()
        self._tasks.append(asyncio.create_task(self.meter.replay_forever()))
        book = self.leases
        if book is not None:  # billing pushes price changes over the lease book's feed: poll rarely then
            book.on_prices = self.meter.prices_changed
        self._tasks.append(asyncio.create_task(self.meter.refresh_prices_forever(
            self.config.price_refresh_s, pushed=None if book is None else lambda: book.watching)))
        if self.leases is not None:
            self._tasks.append(asyncio.create_task(self.leases.refresh_forever()))
            self._tasks.append(asyncio.create_task(self.leases.follow_changes()))
        released = await asyncio.to_thread(self.job_store.take_over_from_previous_life,
                                           Path(self.config.data_dir) / "batch_claimant")
        if released:
            log.info("batch_items_recovered", items=released)
        if self.usage_stream is not None:
            self._tasks.append(asyncio.create_task(self.usage_stream.run_forever()))
        self._tasks.append(asyncio.create_task(self.runner.run_forever()))
        self._tasks.append(asyncio.create_task(self.workflow_runner.run_forever()))
        self._tasks.append(asyncio.create_task(self.purge_forever()))

    async def purge_expired(self) -> tuple[int, int]:
        """Delete expired contexts and finished jobs past their retention (off the event loop)."""
        contexts = await asyncio.to_thread(self.contexts.purge)
        ended_before = datetime.now(UTC) - timedelta(seconds=self.config.job_retention_s)
        jobs = await asyncio.to_thread(self.job_store.purge_finished, ended_before)
        if contexts or jobs:
            log.info("retention_purged", contexts=contexts, jobs=jobs)
        return contexts, jobs

    async def purge_forever(self) -> None:
        """Purge at start, then every `retention_purge_interval_s`; a failure is logged and retried."""
        while True:
            # Shielded: a purge in progress on its thread finishes before close() closes the stores.
            self._purging = asyncio.ensure_future(self.purge_expired())
            try:
                await asyncio.shield(self._purging)
            except Exception:
                log.exception("retention_purge_failed")
            await asyncio.sleep(self.config.retention_purge_interval_s)

    async def _budget_level(self, principal: Principal, tags: dict[str, str]) -> AlertLevel:
        return await self.meter.check_level(principal.tenant_id, principal.key_id, tags)

    async def _run_batch_item(self, ctx: RequestContext, request: GenerationRequest) -> tuple[str, Summary]:
        """A batch item runs as its submitting key; a key revoked since then stops its pending items."""
        try:
            record = await self.keys.aget(ctx.principal.key_id)
        except NotFound:
            record = None  # a JWT principal: no stored key
        if record is not None and record.revoke_time is not None:
            raise Unauthenticated(f"API key {record.prefix}… that submitted this job was revoked")
        return await self.gateway.complete(ctx, request)

    async def _workflow_attempt(self, record: UsageRecord, cost: Money) -> None:
        """Every usage event of a workflow node (tagged by the runner) counts in the workflow's totals."""
        workflow_id, node_id = record.tags.get("workflow"), record.tags.get("workflow_node")
        if workflow_id and node_id:
            await self.workflow_store.record_attempt(record.tenant_id, workflow_id, node_id, record.event_id,
                                                     Usage(record.prompt_tokens, record.completion_tokens), cost)

    async def _run_workflow_node(self, call: NodeCall) -> tuple[str, Summary]:
        """A workflow node runs as its submitting key (refused once that key is revoked), through the gateway."""
        spec = call.spec
        if spec.kind == TaskKind.UNSPECIFIED:
            request = GenerationRequest(model=call.model, prompt=spec.prompt, messages=spec.messages,
                                        sampling=spec.sampling, tags=call.ctx.tags, traffic_class=call.traffic_class)
            return await self._run_batch_item(call.ctx, request)
        self._check_key(call.ctx.principal)
        task = TaskSpec(kind=spec.kind, content=spec.content, length_unit=spec.length_unit,
                        length_value=spec.length_value, output_format=spec.output_format,
                        target_language=spec.target_language, labels=spec.labels, fields=spec.fields, style=spec.style)
        return await self.gateway.run_task(call.ctx, call.model, task, spec.sampling, call.traffic_class)

    def _check_key(self, principal: Principal) -> None:
        try:
            record = self.keys.get(principal.key_id)
        except NotFound:
            return  # a JWT principal: no stored key
        if record.revoke_time is not None:
            raise Unauthenticated(f"API key {record.prefix}… that submitted this work was revoked")

    def _watch_model(self, model: ModelEntry) -> None:
        for version in model.versions:
            self.monitor.watch(version.replicas)

    async def bootstrap_models(self) -> None:
        """Register the model served by the configured inference replicas when the registry lacks it."""
        by_model: dict[tuple[str, str], list[str]] = {}
        windows: dict[str, int] = {}
        for address in self.config.inference_targets:
            try:
                info = await self.inference.model_info(address)
            except DomainError as exc:
                log.warning("inference_target_unreachable", replica=address, reason=exc.message)
                continue
            by_model.setdefault((info.name, info.version), []).append(address)
            windows[info.name] = info.context_window
        previous = self._load_bootstrap()
        for (name, version), replicas in by_model.items():
            if name not in self.registry:
                self.registry.register(name, version, tuple(replicas), context_window=windows[name],
                                       actor="router.bootstrap")
                log.info("model_registered_from_inference", model=name, version=version, replicas=replicas)
                continue
            if not self.registry.get(name).context_window:
                self.registry.set_context_window(name, windows[name])
            earlier = previous.get(name, {})
            known = {v.version for v in self.registry.get(name).versions}
            if not earlier and version in known:
                continue  # registered by an operator: leave it as they set it
            # Bootstrapped on an earlier start: the configured replicas are the truth now (ports change
            # between starts, and a rebuilt model is a new version that takes over from the one it replaces).
            self.registry.register(name, version, tuple(replicas), context_window=windows[name],
                                   actor="router.bootstrap")
            stale = [v for v in self.registry.get(name).versions if v.version != version
                     and v.version in earlier and set(v.replicas) <= set(earlier[v.version])]
            if stale:
                self.registry.promote(name, version, actor="router.bootstrap")
            log.info("model_replicas_refreshed_from_inference", model=name, version=version, replicas=replicas,
                     replaced_versions=[v.version for v in stale])
        served: dict[str, dict[str, list[str]]] = {}
        for (name, version), replicas in by_model.items():
            served.setdefault(name, {})[version] = replicas
        self._save_bootstrap(served)

    def _bootstrap_path(self) -> Path:
        return Path(self.config.data_dir) / "bootstrap_replicas.json"

    def _load_bootstrap(self) -> dict[str, dict[str, list[str]]]:
        path = self._bootstrap_path()
        return dict(json.loads(path.read_text())) if path.exists() else {}

    def _save_bootstrap(self, served: dict[str, dict[str, list[str]]]) -> None:
        self._bootstrap_path().write_text(json.dumps(served, indent=2) + "\n")



    def healthy_replicas(self, model: ModelEntry) -> dict[str, int]:
        return self.gateway.healthy_replicas(model)

    def store_available(self) -> bool:
        return self._stores.available

    async def close(self) -> None:
        await self.workflow_runner.close()
        await self.runner.close()
        if self.usage_stream is not None:  # what billing has not acked by then stays journaled
            await self.usage_stream.close(self.config.billing_timeout_s)
        await self.gateway.drain()
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._purging is not None:
            await asyncio.wait([self._purging])
        if self.leases is not None:
            await self.leases.close()
        await self.monitor.close()
        await self.inference.close()
        await self.billing.close()
        await self.billing_operator.close()
        await self.limiter.close()
        for store in (self.keys, self.registry, self.policies, self.contexts, self.spool, self.journal, self.job_store):
            store.close()
