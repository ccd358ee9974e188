"""Which of grpc core's I/O paths every process of the mesh runs on.

grpc core's EventEngine I/O path (the default) hands every completion from its own threads to the poller
thread that wakes the asyncio loop; the older iomgr path polls the sockets on that poller thread itself.
Every service here turns one call into several (the router: Reserve + Generate + Settle; a sidecar: one
call in, one out), so fewer thread hand-offs per call are measurably cheaper: bench/sidecar measured about
20 % less CPU per proxied unary call and about 0.2 ms less added latency, bench/router about 0.5 ms less
added latency per request. An operator's own GRPC_EXPERIMENTS always wins.

grpc reads GRPC_EXPERIMENTS once, when its core library loads, so this module must not import grpc.
"""

from __future__ import annotations

import os
import sys

IOMGR_EXPERIMENTS = "-event_engine_client,-event_engine_listener,-event_engine_for_all_other_endpoints"


def default_to_iomgr() -> None:
    """Before grpc is imported: choose the iomgr path unless the operator set GRPC_EXPERIMENTS."""
    os.environ.setdefault("GRPC_EXPERIMENTS", IOMGR_EXPERIMENTS)


def prefer_iomgr_polling() -> None:
    """When GRPC_EXPERIMENTS is unset: set it and, if grpc is already loaded, re-execute this same command
    line (same PID) so the process runs on the iomgr path."""
    if "GRPC_EXPERIMENTS" in os.environ:
        return
    os.environ["GRPC_EXPERIMENTS"] = IOMGR_EXPERIMENTS
    if "grpc" in sys.modules:
        sys.stdout.flush()
        sys.stderr.flush()
        os.execv(sys.executable, sys.orig_argv)
