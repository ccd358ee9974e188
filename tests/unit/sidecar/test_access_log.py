"""The access log's two sinks write the same fields: structlog (default) and the buffered JSON stream the
sidecar process uses, which holds lines until flushed."""

from __future__ import annotations

import io
import json

from structlog.testing import capture_logs

from sidecar.access_log import AccessLog

CALL = {"method": "/autoglm.inference.v1.InferenceService/Generate", "status": "OK", "duration_ms": 1.23456,
        "bytes_in": 10, "bytes_out": 20, "peer": "spiffe://autoglm.local/ns/default/sa/router",
        "trace_id": "4bf92f3577b34da6a3ce929d0e0e4736", "request_id": "req-1", "upstream": "127.0.0.1:1",
        "attempts": 2, "message": "retried once"}


def test_buffered_sink_writes_one_json_line_per_call_with_the_structlog_fields() -> None:
    stream = io.StringIO()
    buffered = AccessLog("inference", "inbound", stream=stream)
    with capture_logs() as logs:
        AccessLog("inference", "inbound").record(**CALL)
    buffered.record(**CALL)
    buffered.flush()
    (line,) = stream.getvalue().splitlines()
    fast = json.loads(line)
    (slow,) = logs
    assert {k: v for k, v in fast.items() if k not in ("level", "timestamp", "service")} == \
        {k: v for k, v in slow.items() if k != "log_level"}
    assert fast["duration_ms"] == 1.235 and fast["detail"] == "retried once" and fast["timestamp"].endswith("Z")


def test_disabled_access_log_writes_nothing() -> None:
    stream = io.StringIO()
    log = AccessLog("inference", "inbound", enabled=False, stream=stream)
    log.record(**CALL)
    log.flush()
    assert stream.getvalue() == ""
