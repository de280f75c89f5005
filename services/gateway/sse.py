"""Server-sent events as OpenAI streams them: `data: <compact json>\n\n` per chunk, then
`data: [DONE]\n\n`. Nothing else goes on the wire (no `event:` or `id:` lines, no comments), so a
byte-exact client parser sees exactly what it would from api.openai.com."""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

DONE = b"data: [DONE]\n\n"


def encode_event(payload: dict[str, Any]) -> bytes:
    # Compact separators and raw UTF-8: the smallest frame, and identical to OpenAI's framing.
    return (
        b"data: "
        + json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode()
        + b"\n\n"
    )


class SSEWriter:
    """Writes one response's events. `start` sends the headers; the first event goes out as soon
    as it is written (no buffering), which is what time-to-first-token depends on."""

    def __init__(self, request: web.Request) -> None:
        self._request = request
        self.response = web.StreamResponse(
            status=200,
            headers={
                "Content-Type": "text/event-stream; charset=utf-8",
                "Cache-Control": "no-cache",
                "Connection": "keep-alive",
                # Proxies such as nginx must not hold events back.
                "X-Accel-Buffering": "no",
            },
        )
        self.started = False
        self.closed = False

    async def start(self) -> None:
        if not self.started:
            await self.response.prepare(self._request)
            self.started = True

    async def send(self, payload: dict[str, Any]) -> None:
        await self.start()
        await self.response.write(encode_event(payload))

    async def send_many(self, payloads: list[dict[str, Any]]) -> None:
        """Several events in one write: one syscall per scheduler step, not one per choice."""
        if payloads:
            await self.start()
            await self.response.write(b"".join(encode_event(p) for p in payloads))

    async def done(self) -> None:
        await self.start()
        await self.response.write(DONE)
        await self.response.write_eof()
        self.closed = True
