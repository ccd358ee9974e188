"""Webhook delivery of budget alerts: JSON POST, retried with exponential backoff (and jitter) on failure."""

from __future__ import annotations

import asyncio
import json
import random
import urllib.error
import urllib.request
from typing import Any

import structlog

log = structlog.get_logger(__name__)


class WebhookSender:
    def __init__(self, attempts: int = 5, backoff_s: float = 0.5, timeout_s: float = 5.0) -> None:
        self.attempts = attempts
        self.backoff_s = backoff_s
        self.timeout_s = timeout_s
        self._tasks: set[asyncio.Task[bool]] = set()

    def send(self, url: str, payload: dict[str, Any]) -> asyncio.Task[bool]:
        task = asyncio.create_task(self.deliver(url, payload))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def deliver(self, url: str, payload: dict[str, Any]) -> bool:
        body = json.dumps(payload, sort_keys=True).encode()
        delay = self.backoff_s
        for attempt in range(1, self.attempts + 1):
            try:
                status = await asyncio.to_thread(self._post, url, body)
                if 200 <= status < 300:
                    log.info("webhook_delivered", url=url, attempt=attempt)
                    return True
                error = f"HTTP {status}"
            except (OSError, urllib.error.URLError) as exc:
                error = str(exc)
            log.warning("webhook_failed", url=url, attempt=attempt, error=error)
            if attempt < self.attempts:
                await asyncio.sleep(delay * (1 + random.random() / 4))
                delay *= 2
        return False

    def _post(self, url: str, body: bytes) -> int:
        request = urllib.request.Request(url, data=body, method="POST",
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                return int(response.status)
        except urllib.error.HTTPError as exc:
            return int(exc.code)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
