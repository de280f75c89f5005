"""One request's ingest per event-loop iteration.

A burst of requests on one gateway process arrives in one epoll wake-up: aiohttp starts a
handler task for each, and asyncio runs every task that is ready in one iteration, so all of
them parse, tokenize and submit (~0.5-1 ms each) before anything else runs. The Serve stream's
writer, woken by the first submit, ran only after the last one: a burst of 64 reached the
executor as one message ~40 ms after the first request could have started its prefill (seen on
the development VM and, with 4 workers and 256 requests, ~50 ms on the H200 host).

Handlers wait at the turnstile before that work. It lets one waiter through per iteration, so
the writer (and any other ready task) gets a turn between two requests' ingest, and a burst
reaches the executor as it is tokenized instead of after it. FIFO: requests keep their order.
"""

from __future__ import annotations

import asyncio
from collections import deque


class Turnstile:
    def __init__(self) -> None:
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._pending = False  # a release is scheduled for the next iteration

    async def turn(self) -> None:
        loop = asyncio.get_running_loop()
        if not self._waiters and not self._pending:
            # Nobody ahead: pass now, but hold the next one back for an iteration.
            self._pending = True
            loop.call_soon(self._release)
            return
        fut: asyncio.Future[None] = loop.create_future()
        self._waiters.append(fut)
        await fut

    def _release(self) -> None:
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():  # a cancelled waiter (client gone) gives its turn away
                fut.set_result(None)
                asyncio.get_running_loop().call_soon(self._release)
                return
        self._pending = False
