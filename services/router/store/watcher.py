"""Following other routers' changes: one thread per store polls the domains' version counters (one small
query per `poll_s`) and hands each watcher the rows that are newer than the last it saw."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import structlog

from services.router.store.base import Row, Tx

log = structlog.get_logger(__name__)


@dataclass
class _Watch:
    domain: str
    table: str
    since: int
    apply: Callable[[list[Row]], None]
    loop: asyncio.AbstractEventLoop | None


class Watcher:
    """`wait(timeout)` returns early when the backend hears of a change (PostgreSQL NOTIFY)."""

    def __init__(self, name: str, read: Callable[[Callable[[Tx], Any]], Any], poll_s: float,
                 wait: Callable[[float], None] | None = None) -> None:
        self._read = read
        self._poll_s = poll_s
        self._stop = threading.Event()
        self._wait = wait or self._stop.wait
        self._watches: list[_Watch] = []
        # Whether the last poll reached the database (True until one fails).
        self.available = True
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name=f"{name}-watcher", daemon=True)

    def add(self, domain: str, table: str, since: int, apply: Callable[[list[Row]], None]) -> None:
        try:
            loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        with self._lock:
            self._watches.append(_Watch(domain, table, since, apply, loop))
        if not self._thread.is_alive():
            self._thread.start()

    @property
    def stopped(self) -> bool:
        return self._stop.is_set()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=self._poll_s + 5)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.poll()
            except Exception as error:  # the database is away: keep serving from memory, try again next round
                if self.available:
                    log.warning("router_store_unreachable", error=str(error))
                self.available = False
            else:
                if not self.available:
                    log.info("router_store_reachable")
                self.available = True
            self._wait(self._poll_s)

    def poll(self) -> None:
        versions: dict[str, int] = self._read(  # type: ignore[assignment]
            lambda tx: {r["domain"]: int(r["version"]) for r in tx.all("SELECT domain, version FROM router_changes")})
        with self._lock:
            watches = list(self._watches)
        for watch in watches:
            current = versions.get(watch.domain, 0)
            if current <= watch.since:
                continue
            rows = self._newer(watch.table, watch.since)
            watch.since = max([current, *(int(r["version"]) for r in rows)])
            if rows and not self._stop.is_set():
                self._deliver(watch, rows)

    def _newer(self, table: str, since: int) -> list[Row]:
        sql = f"SELECT * FROM {table} WHERE version > ? ORDER BY version"
        rows: list[Row] = self._read(lambda tx: tx.all(sql, (since,)))
        return rows

    @staticmethod
    def _deliver(watch: _Watch, rows: list[Row]) -> None:
        if watch.loop is None:
            watch.apply(rows)
            return
        try:
            watch.loop.call_soon_threadsafe(watch.apply, rows)
        except RuntimeError:  # that loop has closed: nobody is left to tell
            pass
