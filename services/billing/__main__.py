"""`python -m services.billing`: run billing.

Settings come from the `billing:` section of `--config` (any BillingConfig field, e.g. `database`,
`hold_ttl_s`, `currency`), then flags: `--database DSN`, `--port-file PATH` (writes the bound port, for
`--port 0`). The default database is `billing.sqlite3` under the mesh data dir (`mesh.data_dir`).
"""

from __future__ import annotations

from services.common.grpc_engine import default_to_iomgr

default_to_iomgr()  # before grpc loads: see services/common/grpc_engine.py

import argparse
from pathlib import Path

from services.billing.config import DEFAULT_PORT, BillingConfig
from services.billing.server import build_server
from services.common.config import LAUNCHER_KEYS, ServerSettings, apply_overrides, load_section
from services.common.grpc_server import RunningServer
from services.common.service_main import run_service


def _arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--database", default="", help="sqlite:///PATH (default under the data dir) or postgresql://...")
    parser.add_argument("--data-dir", type=Path, default=None, help="where the default SQLite file lives")
    parser.add_argument("--port-file", type=Path, default=None, help="write the bound port here once serving")


def config_from(settings: ServerSettings, args: argparse.Namespace) -> BillingConfig:
    section = {k: v for k, v in load_section(args.config, "billing").items() if k not in LAUNCHER_KEYS}
    data_dir = Path(load_section(args.config, "mesh").get("data_dir", ".autoglm"))
    if args.data_dir is not None:
        data_dir = args.data_dir
    config = apply_overrides(BillingConfig(server=settings, data_dir=data_dir), section)
    if args.database:
        config = apply_overrides(config, {"database": args.database})
    return config


async def _build(settings: ServerSettings, args: argparse.Namespace) -> RunningServer:
    running = await build_server(config_from(settings, args))
    if args.port_file is not None:
        tmp = args.port_file.with_suffix(".tmp")
        tmp.write_text(str(running.port))
        tmp.replace(args.port_file)
    return running


if __name__ == "__main__":
    run_service("billing", DEFAULT_PORT, _build, add_arguments=_arguments)
