"""A durable, ordered queue of usage events that could not reach billing.

Events are appended to SQLite before the caller is answered; the meter sends `ready` ones in insertion
order through billing's idempotent RecordUsage (keyed by event id) and `remove`s each one only after
billing acknowledged it, so a crash between the two re-sends an event that billing then ignores. An
event billing refuses (rather than fails to hear) is never dropped: `defer` keeps it, out of the queue's
way, until a later retry.
"""

from __future__ import annotations

import json
import mmap
import os
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path

from services.common.generation import TrafficClass
from services.common.usage import UsageStatus
from services.router.ports import UsageRecord
from services.router.sqlite_util import connect


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
    data["lease_ids"] = tuple(data.get("lease_ids", ()))
    return UsageRecord(**data)


class UsageSpool:
    def __init__(self, path: Path, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock  # wall-clock seconds: a deferral outlives a restart
        self._conn = connect(path)
        self._conn.execute("PRAGMA synchronous=FULL")
        self._conn.execute(
            "CREATE TABLE IF NOT EXISTS spool (seq INTEGER PRIMARY KEY AUTOINCREMENT,"
            " event_id TEXT NOT NULL UNIQUE, body TEXT NOT NULL, not_before REAL NOT NULL DEFAULT 0)"
        )
        columns = {row["name"] for row in self._conn.execute("PRAGMA table_info(spool)")}
        if "not_before" not in columns:  # a spool written before deferrals existed
            self._conn.execute("ALTER TABLE spool ADD COLUMN not_before REAL NOT NULL DEFAULT 0")
        self._lock = threading.Lock()

    def append(self, usage: UsageRecord) -> None:
        with self._lock:
            self._conn.execute(
                "INSERT OR IGNORE INTO spool (event_id, body) VALUES (?, ?)", (usage.event_id, _encode(usage))
            )

    def ready(self, limit: int = 100) -> list[tuple[int, UsageRecord]]:
        """The oldest events not deferred into the future, in insertion order."""
        with self._lock:
            rows = self._conn.execute("SELECT seq, body FROM spool WHERE not_before <= ? ORDER BY seq LIMIT ?",
                                      (self._clock(), limit)).fetchall()
        return [(row["seq"], _decode(row["body"])) for row in rows]

    def __len__(self) -> int:
        with self._lock:
            return int(self._conn.execute("SELECT COUNT(*) FROM spool").fetchone()[0])

    def remove(self, seq: int) -> None:
        with self._lock:
            self._conn.execute("DELETE FROM spool WHERE seq = ?", (seq,))

    def defer(self, seq: int, delay_s: float) -> None:
        """Keep the event, but leave it out of `ready` for `delay_s` (> 0) seconds."""
        if delay_s <= 0:
            raise ValueError("a deferral must be > 0 s")
        with self._lock:
            self._conn.execute("UPDATE spool SET not_before = ? WHERE seq = ?", (self._clock() + delay_s, seq))

    def close(self) -> None:
        self._conn.close()


def _records(view: bytes | mmap.mmap) -> Iterator[tuple[int, int, bytes]]:
    """(offset, kind, body) of every complete record of one journal file's contents, in order."""
    pos, size, header = 0, len(view), _MappedLog.HEADER
    while pos + header <= size:
        length = int.from_bytes(view[pos:pos + 4], "little")
        if length == 0 or pos + header + length > size:
            return
        yield pos, view[pos + 4], view[pos + header:pos + header + length]
        pos += header + length


class _MappedLog:
    """One memory-mapped record file: a record is a 4-byte length, one kind byte and a body; the length
    is stored last, so a record cut short reads as the end."""

    HEADER = 5

    def __init__(self, path: Path, capacity: int) -> None:
        self.path = path
        self.map = self._open(capacity)
        self.end = 0
        for pos, _, body in self.records():
            self.end = pos + self.HEADER + len(body)

    def _open(self, capacity: int) -> mmap.mmap:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            if os.fstat(fd).st_size < capacity:
                os.ftruncate(fd, capacity)  # the new part reads as zeros
            return mmap.mmap(fd, 0)
        finally:
            os.close(fd)

    def grow(self, capacity: int) -> None:
        self.map.close()
        self.map = self._open(capacity)

    def records(self) -> Iterator[tuple[int, int, bytes]]:
        """(offset, kind, body) of every complete record, in order."""
        return _records(self.map)

    def fits(self, size: int) -> bool:
        return self.end + self.HEADER + size <= len(self.map)

    def put(self, body: bytes, kind: int) -> int:
        view, pos = self.map, self.end
        view[pos + 4] = kind
        view[pos + self.HEADER:pos + self.HEADER + len(body)] = body
        view[pos:pos + 4] = len(body).to_bytes(4, "little")  # last: now the record exists
        self.end = pos + self.HEADER + len(body)
        return pos

    def body(self, pos: int) -> bytes:
        length = int.from_bytes(self.map[pos:pos + 4], "little")
        return self.map[pos + self.HEADER:pos + self.HEADER + length]

    def zero(self) -> None:
        self.map[:self.end] = bytes(self.end)
        self.end = 0

    def close(self) -> None:
        self.map.flush()
        self.map.close()


ANSWERED, SETTLED = ord("A"), ord("S")


class SettlementJournal:
    """Usage events answered to the caller but not yet handed to billing or to the spool.

    The router answers as soon as the cost is known and settles just after; an event is written here
    before the answer and marked settled once billing has it (or the spool does), so a router killed in
    between loses nothing: at its next start `recover` moves what is left to the spool, which replays it
    through billing's idempotent RecordUsage (a hold left behind simply expires).

    Two memory-mapped files (MAP_SHARED) take turns: writing a record is a copy into the OS page cache,
    which survives the process dying, costs no system call and never lets go of the GIL on the answer's
    path (no fsync: a power cut may lose it, as it may the answer itself). Settling flips the record's
    kind byte in place. When the active file is full, the outstanding records are copied to the other
    file before the full one is cleared, so at every moment each outstanding event is in at least one
    of them (an event found in both is sent once more and ignored by billing).
    """

    def __init__(self, path: Path, capacity: int = 4 << 20) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        capacity = max(capacity, 4096)
        self._logs = [_MappedLog(path.with_name(path.name + suffix), capacity) for suffix in (".0", ".1")]
        self._active = 0 if self._logs[0].end >= self._logs[1].end else 1
        self._outstanding: dict[str, int] = {}  # event id -> offset in the active file
        self._closed = False

    def write(self, usage: UsageRecord) -> None:
        if self._closed:
            raise RuntimeError("the settlement journal is closed")
        body = _encode(usage).encode()
        if not self._logs[self._active].fits(len(body)):
            self._switch(len(body))
        self._outstanding[usage.event_id] = self._logs[self._active].put(body, ANSWERED)

    def _switch(self, need: int) -> None:
        """Copy the outstanding records to the other file (grown if they would fill half of it), then
        clear the full one."""
        full, other = self._logs[self._active], self._logs[1 - self._active]
        live = [(event_id, bytes(full.body(pos))) for event_id, pos in self._outstanding.items()]
        size = sum(_MappedLog.HEADER + len(body) for _, body in live) + _MappedLog.HEADER + need
        other.zero()
        if size > len(other.map) // 2:
            other.grow(max(len(other.map) * 2, size * 2))
        self._outstanding = {event_id: other.put(body, ANSWERED) for event_id, body in live}
        self._active = 1 - self._active
        full.zero()

    def clear(self, event_id: str) -> None:
        pos = self._outstanding.pop(event_id, None)
        if pos is None or self._closed:
            return  # after close the record stays answered and is recovered at the next start
        active = self._logs[self._active]
        active.map[pos + 4] = SETTLED
        if not self._outstanding and active.end > len(active.map) // 2:
            active.zero()  # nothing is outstanding: start over

    def __len__(self) -> int:
        return len(self._outstanding)

    def recover(self, spool: UsageSpool) -> int:
        """Move every event an earlier run left unsettled to the spool; returns how many. Call before the
        first `write`."""
        found: dict[str, UsageRecord] = {}
        for log in self._logs:
            for _, kind, body in log.records():
                if kind != ANSWERED:
                    continue
                try:
                    usage = _decode(body.decode())
                except (ValueError, TypeError, KeyError, UnicodeDecodeError):
                    continue
                found.setdefault(usage.event_id, usage)
        for usage in sorted(found.values(), key=lambda u: u.end_time):
            spool.append(usage)  # durable (synchronous=FULL) before the journal forgets it
        if not self._outstanding:
            for log in self._logs:
                log.zero()
        return len(found)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            for log in self._logs:
                log.close()


def unsettled_events(path: Path) -> int:
    """How many events the journal at `path` holds answered but not yet settled, read from its files
    without mapping or changing them: for a check from outside the router (is settlement idle?)."""
    found: set[str] = set()
    for suffix in (".0", ".1"):
        try:
            contents = path.with_name(path.name + suffix).read_bytes()
        except FileNotFoundError:
            continue
        for _, kind, body in _records(contents):
            if kind == ANSWERED:
                try:
                    found.add(str(json.loads(body)["event_id"]))
                except (ValueError, TypeError, KeyError):
                    continue
    return len(found)
