"""The launcher's view of `deploy/local/mesh.yaml` (each service reads its own section itself)."""

from __future__ import annotations

import datetime as dt
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


@dataclass(frozen=True)
class MeshConfig:
    data_dir: Path = Path(".autoglm")
    router_port: int = 50051
    # The router's OpenAI-compatible HTTP API (0: off).
    router_http_port: int = 8443
    billing_port: int = 50061
    inference_base_port: int = 50071
    inference_replicas: int = 1
    shutdown_grace_s: float = 15.0
    # Lifetime of the services' mTLS certificates; each is reissued after 2/3 of it while the mesh runs.
    cert_lifetime_hours: float = 168.0
    # Prometheus /metrics ports (0 disables); inference replica i uses inference_metrics_port + i.
    router_metrics_port: int = 9101
    billing_metrics_port: int = 9102
    inference_metrics_port: int = 9110
    # Prices created at start-up for models that have none yet: {model, currency, input/output micros per million}.
    seed_prices: tuple[dict[str, Any], ...] = field(default_factory=tuple)
    # Default sampling given at start-up to each version of these models that has none:
    # {model, temperature, top_p, top_k, repetition_penalty} (any subset of the four).
    seed_sampling: tuple[dict[str, Any], ...] = field(default_factory=tuple)
    # `billing.operator_token` / `operator_token_file` when the mesh file sets them (neither: billing makes
    # <data_dir>/billing_operator_token).
    billing_operator_token: str = ""
    billing_operator_token_file: str = ""
    # `inference.engine_metering`: each replica reports its finished sequences to billing (through its
    # sidecar's outbound listener), which bills the ones no router event came for.
    engine_metering: bool = True
    # Router processes behind the one public address (`router.replicas`); more than one needs the shared
    # state below: `router.database` (postgresql://) and `router.rate_limit_redis_url`.
    router_replicas: int = 1
    router_database: str = ""
    router_rate_limit_redis_url: str = ""

    def __post_init__(self) -> None:
        self.check_router_replicas()

    def check_router_replicas(self) -> None:
        """Several routers must share keys, registry, conversations and jobs (PostgreSQL) and their rate
        limits (Redis): without both they would each answer from state of their own."""
        if self.router_replicas < 1:
            raise ValueError(f"router.replicas is {self.router_replicas}: run at least 1 router")
        if self.router_replicas == 1:
            return
        missing = []
        if not self.router_database.startswith(("postgresql://", "postgres://")):
            missing.append("router.database: postgresql://... (keys, models, policies, conversations and jobs "
                           "every router shares)")
        if not self.router_rate_limit_redis_url:
            missing.append("router.rate_limit_redis_url: redis://... (per-key rate limits every router counts "
                           "together)")
        if missing:
            raise ValueError(f"router.replicas is {self.router_replicas}, which needs " + " and ".join(missing)
                             + "; set them in the mesh file, or set router.replicas: 1")

    @property
    def cert_lifetime(self) -> dt.timedelta:
        return dt.timedelta(hours=self.cert_lifetime_hours)

    @classmethod
    def load(cls, path: Path | None) -> MeshConfig:
        doc: dict[str, Any] = {}
        if path is not None:
            doc = yaml.safe_load(path.read_text()) or {}
        mesh = doc.get("mesh") or {}
        data_dir = Path(os.path.expanduser(str(mesh.get("data_dir", cls.data_dir))))
        router, billing, inference = (doc.get("router") or {}), (doc.get("billing") or {}), (doc.get("inference") or {})
        return cls(
            data_dir=data_dir,
            router_metrics_port=int(router.get("metrics_port", cls.router_metrics_port)),
            billing_metrics_port=int(billing.get("metrics_port", cls.billing_metrics_port)),
            inference_metrics_port=int(inference.get("metrics_port", cls.inference_metrics_port)),
            router_port=int((doc.get("router") or {}).get("port", cls.router_port)),
            router_http_port=int(router.get("http_port", cls.router_http_port)),
            billing_port=int((doc.get("billing") or {}).get("port", cls.billing_port)),
            inference_base_port=int((doc.get("inference") or {}).get("port", cls.inference_base_port)),
            inference_replicas=int((doc.get("inference") or {}).get("replicas", cls.inference_replicas)),
            shutdown_grace_s=float(mesh.get("shutdown_grace_s", cls.shutdown_grace_s)),
            cert_lifetime_hours=float(mesh.get("cert_lifetime_hours", cls.cert_lifetime_hours)),
            seed_prices=tuple(mesh.get("seed_prices") or ()),
            seed_sampling=tuple(mesh.get("seed_sampling") or ()),
            billing_operator_token=str(billing.get("operator_token") or ""),
            billing_operator_token_file=str(billing.get("operator_token_file") or ""),
            engine_metering=bool(inference.get("engine_metering", cls.engine_metering)),
            router_replicas=int(router.get("replicas", cls.router_replicas)),
            router_database=str(router.get("database") or ""),
            router_rate_limit_redis_url=str(router.get("rate_limit_redis_url") or ""),
        )
