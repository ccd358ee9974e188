"""Settings every server shares, read once at the edge (flags, environment, mesh file)."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


@dataclass(frozen=True)
class ServerSettings:
    host: str = "127.0.0.1"
    port: int = 0
    log_level: str = "INFO"
    log_json: bool = True
    # OTLP/gRPC endpoint for traces (e.g. "127.0.0.1:4317"); empty disables export.
    otlp_endpoint: str = ""
    # Seconds in-flight calls get to finish on SIGTERM.
    shutdown_grace_s: float = 10.0
    # Prometheus /metrics port on loopback; None disables, 0 picks a free port.
    metrics_port: int | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be 0..65535, got {self.port}")
        if self.shutdown_grace_s < 0:
            raise ValueError("shutdown_grace_s must be >= 0")


def add_server_arguments(parser: argparse.ArgumentParser, default_port: int) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=default_port, help=f"port (default {default_port}; 0 = any free)")
    parser.add_argument("--config", type=Path, help="mesh YAML file; this service reads its own section")
    parser.add_argument("--log-level", default=os.environ.get("AUTOGLM_LOG_LEVEL", "INFO"))
    parser.add_argument("--otlp-endpoint", default=os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT", ""))
    parser.add_argument("--metrics-port", type=int, default=None, help="serve Prometheus /metrics on this port")


def server_settings_from_args(args: argparse.Namespace) -> ServerSettings:
    return ServerSettings(host=args.host, port=args.port, log_level=args.log_level, otlp_endpoint=args.otlp_endpoint,
                          metrics_port=args.metrics_port)


# Keys of a service's section that the launcher reads and passes as flags (--port, --metrics-port, ...).
LAUNCHER_KEYS = frozenset({"host", "port", "metrics_port", "replicas"})


def load_section(path: Path | None, section: str) -> dict[str, Any]:
    """The `section` mapping of a mesh YAML file ({} when there is no file or no section), without the
    launcher's keys (LAUNCHER_KEYS), which reach the service as flags."""
    if path is None:
        return {}
    document = yaml.safe_load(path.read_text()) or {}
    if not isinstance(document, dict):
        raise ValueError(f"{path}: expected a mapping at the top level")
    value = document.get(section) or {}
    if not isinstance(value, dict):
        raise ValueError(f"{path}: section {section!r} must be a mapping")
    return {k: v for k, v in value.items() if k not in LAUNCHER_KEYS}


def apply_overrides(config: T, overrides: dict[str, Any]) -> T:
    """Return `config` (a frozen dataclass) with the known keys of `overrides` replaced; unknown keys fail."""
    known = {f.name for f in fields(config)}  # type: ignore[arg-type]
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    return replace(config, **overrides)  # type: ignore[type-var]
