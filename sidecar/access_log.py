"""One structlog JSON line per proxied call: method, status, duration, bytes, peer identity, trace id."""

from __future__ import annotations

import structlog


class AccessLog:
    def __init__(self, service: str, direction: str, enabled: bool = True) -> None:
        self.enabled = enabled
        self.service = service
        self.direction = direction
        self._log = structlog.get_logger("sidecar.access")

    def record(self, *, method: str, status: str, duration_ms: float, bytes_in: int, bytes_out: int,
               peer: str, trace_id: str, request_id: str, upstream: str, attempts: int, message: str = "") -> None:
        if not self.enabled:
            return
        self._log.info("access", sidecar=self.service, direction=self.direction, method=method, status=status, duration_ms=round(duration_ms, 3),
                       bytes_in=bytes_in, bytes_out=bytes_out, peer=peer, trace_id=trace_id,
                       request_id=request_id, upstream=upstream, attempts=attempts,
                       **({"detail": message} if message else {}))
