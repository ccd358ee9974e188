"""Refused TLS handshakes, logged.

grpc core refuses a bad client certificate (none, another CA, expired, a plaintext client) inside its
TLS handshaker, before any Python code runs, and says so only in its own C log, at INFO verbosity:
`... ssl_transport_security.cc:NNNN] Handshake failed with error SSL_ERROR_SSL: error:...:REASON: ...`.

`capture_handshake_failures()` (used by `python -m sidecar`) turns that line into a structured JSON
event: it raises grpc's verbosity to INFO (unless the operator chose one), points fd 2 at a pipe, and a
reader thread writes every line through to the real stderr except grpc's other INFO chatter, replacing
each handshake failure with `{"event": "tls_handshake_failed", "reason": ..., ...}` and counting it.
The grpc line carries no peer address, so neither does the event.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import threading
from collections.abc import Callable

HANDSHAKE_FAILED = re.compile(r"Handshake failed with error (?P<error>\S+): (?P<detail>.*)$")
GRPC_LOG_LINE = re.compile(r"^[IWEF]\d{4} \d\d:\d\d:\d\d\.\d+\s+\d+ \S+:\d+\] ")
# OpenSSL's reason code inside the detail, e.g. `error:100000c0:SSL routines:OPENSSL_internal:PEER_DID_NOT_...`
REASON = re.compile(r"error:[0-9a-fA-F]+:[^:]*:[^:]*:(?P<reason>[A-Z0-9_]+)")


def parse_failure(line: str) -> dict[str, str] | None:
    """The error and reason of a grpc 'Handshake failed' log line, else None."""
    found = HANDSHAKE_FAILED.search(line)
    if found is None:
        return None
    reason = REASON.search(found["detail"])
    return {"error": found["error"], "reason": reason["reason"] if reason else found["detail"].strip()}


class HandshakeLog:
    """Reads grpc's log lines from a pipe that replaced fd 2; see the module doc."""

    def __init__(self, service: str, keep_grpc_info: bool) -> None:
        self.service = service
        self.keep_grpc_info = keep_grpc_info
        self.refused = 0
        self.on_refused: Callable[[str], None] | None = None
        read_fd, write_fd = os.pipe()
        self._out = os.dup(2)  # the real stderr
        os.dup2(write_fd, 2)
        os.close(write_fd)
        self._reader = os.fdopen(read_fd, "rb")
        self._thread = threading.Thread(target=self._pump, name="handshake-log", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Give fd 2 back to the real stderr and wait until every line in the pipe is written out."""
        os.dup2(self._out, 2)  # closes the pipe's last write end: the reader sees EOF after the backlog
        self._thread.join(timeout=5)

    def _event(self, failure: dict[str, str]) -> bytes:
        line = {"event": "tls_handshake_failed", "level": "warning", "service": f"sidecar-{self.service}",
                "sidecar": self.service, "error": failure["error"], "reason": failure["reason"],
                "timestamp": dt.datetime.now(dt.UTC).isoformat().replace("+00:00", "Z")}
        return (json.dumps(line) + "\n").encode()

    def _pump(self) -> None:
        for raw in self._reader:
            text = raw.decode("utf-8", "replace")
            failure = parse_failure(text) if GRPC_LOG_LINE.match(text) else None
            if failure is not None:
                self.refused += 1
                if self.on_refused is not None:
                    self.on_refused(failure["reason"])
                raw = self._event(failure)
            elif not self.keep_grpc_info and text.startswith("I") and GRPC_LOG_LINE.match(text):
                continue  # grpc INFO lines the operator did not ask for
            os.write(self._out, raw)


def capture_handshake_failures(service: str) -> HandshakeLog:
    """Call before grpc starts (it reads GRPC_VERBOSITY once)."""
    chosen = os.environ.get("GRPC_VERBOSITY")
    if chosen is None:
        os.environ["GRPC_VERBOSITY"] = "INFO"
    return HandshakeLog(service, keep_grpc_info=chosen is not None and chosen.upper() in ("INFO", "DEBUG"))
