"""Server-Sent Events framing, and the streaming response that closes its source when the client leaves.

`data: {json}\\n\\n` per event, `data: [DONE]\\n\\n` last (also after an error event), `: keep-alive`
comments. `EventStream` watches for the client's disconnect while it streams: on disconnect (or a
failed send) it stops and closes its source in `finally`, so the gateway's iterator is closed and the
request is billed as cancelled with the tokens delivered, as a cancelled gRPC stream is.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable

import anyio
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

DONE = b"data: [DONE]\n\n"
KEEP_ALIVE = b": keep-alive\n\n"
HEADERS = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"),
           (b"x-accel-buffering", b"no")]


def event(data: bytes | str) -> bytes:
    """One `data:` event. JSON has no raw newlines, so one `data:` line carries it."""
    payload = data.encode() if isinstance(data, str) else data
    if b"\n" in payload or b"\r" in payload:
        raise ValueError("an SSE data line cannot hold a newline")
    return b"data: " + payload + b"\n\n"


class EventStream(Response):
    """A response streaming `frames` (already framed bytes); `on_close` runs once it ends, however."""

    media_type = "text/event-stream"

    def __init__(self, frames: AsyncIterator[bytes], on_close: Callable[[], Awaitable[None]] | None = None) -> None:
        self.status_code = 200
        self.background = None
        self.frames = frames
        self.on_close = on_close
        self.raw_headers = list(HEADERS)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            async with anyio.create_task_group() as group:
                group.start_soon(self._watch, receive, group.cancel_scope)
                await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
                async for frame in self.frames:
                    await send({"type": "http.response.body", "body": frame, "more_body": True})
                await send({"type": "http.response.body", "body": b"", "more_body": False})
                group.cancel_scope.cancel()
        except OSError:
            pass  # the client went away between two events
        finally:
            with anyio.CancelScope(shield=True):
                aclose = getattr(self.frames, "aclose", None)
                if aclose is not None:
                    await aclose()
                if self.on_close is not None:
                    await self.on_close()

    @staticmethod
    async def _watch(receive: Receive, scope: anyio.CancelScope) -> None:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                scope.cancel()
                return
