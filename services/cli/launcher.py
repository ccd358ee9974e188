"""`autoglm up`: start billing, inference replicas and the router as child processes, in order,
wait for each to be healthy, print a banner, restart children that die (with backoff), and on
Ctrl-C / SIGTERM stop everything in reverse order."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import structlog

from autoglm.billing.v1 import billing_service_pb2, billing_service_pb2_grpc
from autoglm.common.v1 import money_pb2
from autoglm.router.v1 import admin_service_pb2, admin_service_pb2_grpc
from services.cli.health_probe import wait_serving
from services.cli.mesh_config import MeshConfig

log = structlog.get_logger(__name__)


@dataclass
class Child:
    name: str
    argv: list[str]
    address: str
    log_path: Path
    process: asyncio.subprocess.Process | None = None
    restarts: int = 0
    stopping: bool = False
    watcher: asyncio.Task[None] | None = field(default=None, repr=False)

    def alive(self) -> bool:
        return self.process is not None and self.process.returncode is None

    async def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        handle = self.log_path.open("ab")
        self.process = await asyncio.create_subprocess_exec(
            *self.argv, stdout=handle, stderr=handle, stdin=asyncio.subprocess.DEVNULL,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        handle.close()
        log.info("child_started", child=self.name, pid=self.process.pid, address=self.address)

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


def service_argv(module: str, port: int, config: Path | None, metrics_port: int, *extra: str) -> list[str]:
    argv = [sys.executable, "-m", module, "--port", str(port)]
    if metrics_port:
        argv += ["--metrics-port", str(metrics_port)]
    if config:
        argv += ["--config", str(config)]
    return [*argv, *extra]


def plan_children(mesh: MeshConfig, config_path: Path | None) -> list[Child]:
    logs = mesh.data_dir / "logs"
    children = [
        Child("billing", service_argv("services.billing", mesh.billing_port, config_path, mesh.billing_metrics_port),
              f"127.0.0.1:{mesh.billing_port}", logs / "billing.log"),
    ]
    for index in range(mesh.inference_replicas):
        port = mesh.inference_base_port + index
        children.append(
            Child(f"inference-{index}",
                  service_argv("services.inference", port, config_path,
                               mesh.inference_metrics_port + index if mesh.inference_metrics_port else 0, "--replica-id", f"inference-{index}"),
                  f"127.0.0.1:{port}", logs / f"inference-{index}.log")
        )
    inference = ",".join(c.address for c in children if c.name.startswith("inference"))
    children.append(
        Child("router", service_argv("services.router", mesh.router_port, config_path, mesh.router_metrics_port,
                                     "--inference", inference, "--billing", children[0].address,
                                     "--data-dir", str(mesh.data_dir / "router")),
              f"127.0.0.1:{mesh.router_port}", logs / "router.log")
    )
    return children


async def seed_prices(mesh: MeshConfig) -> None:
    """Create the mesh file's seed prices for models that have no price yet (first start)."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{mesh.billing_port}") as channel:
        stub = billing_service_pb2_grpc.BillingServiceStub(channel)
        for seed in mesh.seed_prices:
            existing = await stub.ListPrices(billing_service_pb2.ListPricesRequest(model=seed["model"]), timeout=10)
            if existing.prices:
                continue
            currency = str(seed.get("currency", "USD"))
            await stub.CreatePrice(billing_service_pb2.CreatePriceRequest(
                price=billing_service_pb2.Price(
                    model=seed["model"],
                    input_per_million=money_pb2.Money(currency_code=currency, micros=int(seed["input_per_million_micros"])),
                    output_per_million=money_pb2.Money(currency_code=currency,
                                                       micros=int(seed["output_per_million_micros"])),
                ),
                actor="autoglm up (seed price from mesh.yaml)",
            ), timeout=10)
            log.info("price_seeded", model=seed["model"])


async def create_demo_key(mesh: MeshConfig) -> str:
    """Create a fresh demo API key through AdminService and keep it in `<data_dir>/demo_api_key` (0600)."""
    token = (mesh.data_dir / "router" / "admin_token").read_text().strip()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{mesh.router_port}") as channel:
        reply = await admin_service_pb2_grpc.AdminServiceStub(channel).CreateApiKey(
            admin_service_pb2.CreateApiKeyRequest(tenant_id="demo", name="demo key created by autoglm up"),
            metadata=(("authorization", f"Bearer {token}"),), timeout=10,
        )
    path = mesh.data_dir / "demo_api_key"
    path.touch(mode=0o600)
    path.write_text(reply.secret + "\n")
    return str(reply.secret)


async def supervise(child: Child, backoff_max: float = 30.0) -> None:
    """Restart `child` whenever it exits unexpectedly, with exponential backoff."""
    delay = 0.5
    while not child.stopping:
        assert child.process is not None
        code = await child.process.wait()
        if child.stopping:
            return
        child.restarts += 1
        log.warning("child_exited_restarting", child=child.name, returncode=code, restart=child.restarts,
                    backoff_s=delay)
        await asyncio.sleep(delay)
        delay = min(delay * 2, backoff_max)
        await child.start()


def banner(mesh: MeshConfig, children: list[Child], demo_key: str) -> str:
    lines = [
        "",
        "Open-AutoGLM mesh is up",
        f"  router     127.0.0.1:{mesh.router_port}   (public gRPC: RouterService, AdminService)",
        f"  billing    127.0.0.1:{mesh.billing_port}",
    ]
    lines += [f"  {c.name:<10} {c.address}" for c in children if c.name.startswith("inference")]
    lines += [
        f"  data dir   {mesh.data_dir}",
        f"  logs       {mesh.data_dir / 'logs'}/*.log",
        f"  metrics    http://127.0.0.1:{{{mesh.router_metrics_port},{mesh.billing_metrics_port},"
        f"{mesh.inference_metrics_port}..}}/metrics" if mesh.router_metrics_port else "  metrics    disabled",
        "",
        f"Demo API key (also in {mesh.data_dir / 'demo_api_key'}):",
        f"  {demo_key}",
        "",
        "Try it:",
        f"  grpcurl -plaintext -H 'authorization: Bearer {demo_key}' \\",
        "    -d '{\"model\": \"smollm2-135m-instruct\", \"prompt\": \"Write a haiku about the sea.\"}' \\",
        f"    127.0.0.1:{mesh.router_port} autoglm.router.v1.RouterService/Generate",
        f"  grpcurl -plaintext 127.0.0.1:{mesh.router_port} list",
        "  .venv/bin/autoglm chat",
        "",
        "Ctrl-C stops everything.",
    ]
    return "\n".join(lines)


async def run_mesh(mesh: MeshConfig, config_path: Path | None, ready_timeout_s: float = 600.0) -> None:
    children = plan_children(mesh, config_path)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    started: list[Child] = []
    try:
        for child in children:
            await child.start()
            started.append(child)
            waiter = asyncio.create_task(wait_serving(child.address, ready_timeout_s, child.alive))
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
                await seed_prices(mesh)
        demo_key = await create_demo_key(mesh)
        print(banner(mesh, children, demo_key), flush=True)
        await stop.wait()
    finally:
        print("stopping the mesh...", file=sys.stderr, flush=True)
        for child in reversed(started):
            await child.stop(mesh.shutdown_grace_s)
