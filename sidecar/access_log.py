"""One JSON line per proxied call: method, status, duration, bytes, peer identity, trace id.

Two sinks with the same fields. By default the line goes through structlog (so `capture_logs` and any
structlog configuration see it). The sidecar process (`python -m sidecar`) uses the cheap sink instead:
the line is built with one `json.dumps` and written to a block-buffered stream that is flushed a few
times a second and on stop, so the hot path pays no structlog processor chain and no syscall per call.
"""

from __future__ import annotations

import datetime as dt
import json
import time
from typing import IO, Any

import structlog

FLUSH_INTERVAL_S = 0.2


class AccessLog:
    def __init__(self, service: str, direction: str, enabled: bool = True, stream: IO[str] | None = None) -> None:
        self.enabled = enabled
        self.service = service
        self.direction = direction
        self._log = structlog.get_logger("sidecar.access")
        self._stream = stream
        self._dirty = False
        self._dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode

    def record(self, *, method: str, status: str, duration_ms: float, bytes_in: int, bytes_out: int,
               peer: str, trace_id: str, request_id: str, upstream: str, attempts: int, message: str = "") -> None:
        if not self.enabled:
            return
        if self._stream is None:
            self._log.info("access", sidecar=self.service, direction=self.direction, method=method, status=status,
                           duration_ms=round(duration_ms, 3), bytes_in=bytes_in, bytes_out=bytes_out, peer=peer,
                           trace_id=trace_id, request_id=request_id, upstream=upstream, attempts=attempts,
                           **({"detail": message} if message else {}))
            return
        line: dict[str, Any] = {
            "event": "access", "sidecar": self.service, "direction": self.direction, "method": method,
            "status": status, "duration_ms": round(duration_ms, 3), "bytes_in": bytes_in, "bytes_out": bytes_out,
            "peer": peer, "trace_id": trace_id, "request_id": request_id, "upstream": upstream,
            "attempts": attempts, "level": "info", "service": f"sidecar-{self.service}",
            "timestamp": dt.datetime.fromtimestamp(time.time(), dt.UTC).isoformat().replace("+00:00", "Z"),
        }
        if message:
            line["detail"] = message
        self._stream.write(self._dumps(line) + "\n")
        self._dirty = True

    def flush(self) -> None:
        """Write out buffered lines (called every FLUSH_INTERVAL_S and on stop)."""
        if self._stream is not None and self._dirty:
            self._dirty = False
            self._stream.flush()
