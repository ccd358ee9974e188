"""A durable, ordered queue of usage events that could not reach billing.

Events are appended to SQLite before the caller is answered; `replay` sends them in insertion order
through `record` (billing's idempotent RecordUsage, keyed by event id) and deletes each one only after
billing acknowledged it, so a crash between the two re-sends an event that billing then ignores.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Awaitable, Callable
from datetime import datetime
from pathlib import Path

from services.router.ports import UsageRecord
from services.router.sqlite_util import connect
from services.router.types import TrafficClass, UsageStatus


def _encode(usage: UsageRecord) -> str:
    data = dict(vars(usage))  # shallow: every field is a scalar but tags, which json copies anyway
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
    before the answer and marked settled once billing has it (or the spool does), so a router killed in
    between loses nothing: at its next start `recover` moves what is left to the spool, which replays it
    through billing's idempotent RecordUsage (a hold left behind simply expires). An append-only file,
    one write(2) per line: it survives the process dying (the data is in the OS) at the cost of a few
    microseconds on the answer's path, no fsync; the file starts over whenever nothing is outstanding.
    """

    def __init__(self, path: Path, rewind_bytes: int = 1 << 20) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._path = path
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        self._outstanding: set[str] = set()
        self._size = os.fstat(self._fd).st_size
        self._rewind_bytes = rewind_bytes

    def _append(self, line: str) -> None:
        if self._fd < 0:
            raise RuntimeError("the settlement journal is closed")
        data = line.encode()
        os.write(self._fd, data)
        self._size += len(data)

    def write(self, usage: UsageRecord) -> None:
        self._append(f"A {_encode(usage)}\n")
        self._outstanding.add(usage.event_id)

    def clear(self, event_id: str) -> None:
        self._outstanding.discard(event_id)
        if self._fd < 0:
            return  # closed at shutdown: the event stays in the file and is recovered at the next start
        if not self._outstanding and self._size >= self._rewind_bytes:
            os.ftruncate(self._fd, 0)  # nothing is outstanding: start over
            self._size = 0
        else:
            self._append(f"S {json.dumps(event_id)}\n")

    def __len__(self) -> int:
        return len(self._outstanding)

    def recover(self, spool: UsageSpool) -> int:
        """Move every event an earlier run left unsettled to the spool, in order; returns how many."""
        answered: dict[str, UsageRecord] = {}
        with open(self._path, encoding="utf-8", errors="replace") as lines:
            for line in lines:
                kind, _, body = line.rstrip("\n").partition(" ")
                try:
                    if kind == "A":
                        usage = _decode(body)
                        answered[usage.event_id] = usage
                    elif kind == "S":
                        answered.pop(json.loads(body), None)
                except (ValueError, TypeError, KeyError):
                    continue  # a line cut short: its event was never answered
        for usage in answered.values():
            if usage.event_id not in self._outstanding:
                spool.append(usage)  # durable (synchronous=FULL) before the journal forgets it
        if not self._outstanding:
            os.ftruncate(self._fd, 0)
            self._size = 0
        return len(answered)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
