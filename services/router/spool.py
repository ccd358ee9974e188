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


class SettlementJournal:
    """Usage events answered to the caller but not yet handed to billing or to the spool.

    The router answers as soon as the cost is known and settles just after; an event is written here
    before the answer and removed once billing has it (or the spool does), so a router killed in between
    loses nothing: at its next start `recover` moves what is left to the spool, which replays it through
    billing's idempotent RecordUsage (a hold left behind simply expires). WAL with synchronous=NORMAL: a
    commit survives the process dying (it is in the OS), at the cost of one write, no fsync, per request.
    """

    def __init__(self, path: Path) -> None:
        self._conn = connect(path)
        self._conn.execute("CREATE TABLE IF NOT EXISTS unsettled (event_id TEXT PRIMARY KEY, body TEXT NOT NULL)")
        self._lock = threading.Lock()

    def write(self, usage: UsageRecord) -> None:
        with self._lock:
            self._conn.execute("INSERT OR REPLACE INTO unsettled (event_id, body) VALUES (?, ?)",
                               (usage.event_id, _encode(usage)))

    def clear(self, event_id: str) -> None:
        with self._lock:
            self._conn.execute("DELETE FROM unsettled WHERE event_id = ?", (event_id,))

    def __len__(self) -> int:
        with self._lock:
            return int(self._conn.execute("SELECT COUNT(*) FROM unsettled").fetchone()[0])

    def recover(self, spool: UsageSpool) -> int:
        """Move every event left by an earlier run to the spool; returns how many."""
        with self._lock:
            rows = self._conn.execute("SELECT event_id, body FROM unsettled ORDER BY rowid").fetchall()
        for row in rows:
            spool.append(_decode(row["body"]))  # durable (synchronous=FULL) before it leaves the journal
            self.clear(row["event_id"])
        return len(rows)

    def close(self) -> None:
        self._conn.close()
