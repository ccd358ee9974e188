"""A durable, ordered queue of usage events that could not reach billing.

Events are appended to SQLite before the caller is answered; `replay` sends them in insertion order
through `record` (billing's idempotent RecordUsage, keyed by event id) and deletes each one only after
billing acknowledged it, so a crash between the two re-sends an event that billing then ignores.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Awaitable, Callable
from dataclasses import asdict
from datetime import datetime
from pathlib import Path

from services.router.ports import UsageRecord
from services.router.sqlite_util import connect
from services.router.types import TrafficClass, UsageStatus


def _encode(usage: UsageRecord) -> str:
    data = asdict(usage)
    data["start_time"] = usage.start_time.isoformat()
    data["end_time"] = usage.end_time.isoformat()
    data["status"] = int(usage.status)
    data["traffic_class"] = int(usage.traffic_class)
    return json.dumps(data, sort_keys=True)


def _decode(text: str) -> UsageRecord:
    data = json.loads(text)
    data["start_time"] = datetime.fromisoformat(data["start_time"])
    data["end_time"] = datetime.fromisoformat(data["end_time"])
    data["status"] = UsageStatus(data["status"])
    data["traffic_class"] = TrafficClass(data["traffic_class"])
    return UsageRecord(**data)


class UsageSpool:
    def __init__(self, path: Path) -> None:
        self._conn = connect(path)
        self._conn.execute("PRAGMA synchronous=FULL")
        self._conn.execute(
            "CREATE TABLE IF NOT EXISTS spool (seq INTEGER PRIMARY KEY AUTOINCREMENT,"
            " event_id TEXT NOT NULL UNIQUE, body TEXT NOT NULL)"
        )
        self._lock = threading.Lock()

    def append(self, usage: UsageRecord) -> None:
        with self._lock:
            self._conn.execute(
                "INSERT OR IGNORE INTO spool (event_id, body) VALUES (?, ?)", (usage.event_id, _encode(usage))
            )

    def pending(self, limit: int = 100) -> list[tuple[int, UsageRecord]]:
        with self._lock:
            rows = self._conn.execute("SELECT seq, body FROM spool ORDER BY seq LIMIT ?", (limit,)).fetchall()
        return [(row["seq"], _decode(row["body"])) for row in rows]

    def __len__(self) -> int:
        with self._lock:
            return int(self._conn.execute("SELECT COUNT(*) FROM spool").fetchone()[0])

    def remove(self, seq: int) -> None:
        with self._lock:
            self._conn.execute("DELETE FROM spool WHERE seq = ?", (seq,))

    async def replay(self, record: Callable[[UsageRecord], Awaitable[object]]) -> int:
        """Send pending events in order; stop at the first failure (it propagates). Returns how many were sent."""
        sent = 0
        while batch := self.pending():
            for seq, usage in batch:
                await record(usage)
                self.remove(seq)
                sent += 1
        return sent

    def close(self) -> None:
        self._conn.close()
