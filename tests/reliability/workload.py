"""Shared prompts and request makers for the reliability tests."""

from __future__ import annotations

import asyncio
import json
import random
import time
import urllib.request
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import aiohttp

from tests.reliability.client import StreamResult, chat_body, random_prompt, stream_request
from tests.support.mesh import Mesh, wait_for

# A system prompt several blocks long: every request shares its blocks through the prefix index,
# so "the prefix index still hits" is measurable after each fault.
SYSTEM = (
    "You are a terse assistant for a railway timetable office. Answer in one short sentence, "
    "never apologise, never repeat the question, and prefer numbers to words when you can. "
    "Stations: Aldgate, Bexley, Croydon, Dartford, Epsom, Faversham, Guildford, Hastings."
)

STREAM_TIMEOUT = 90.0  # the bound past which a stream counts as hung (lost)


def chat_url(mesh: Mesh) -> str:
    return mesh.url + "/v1/chat/completions"


def completions_url(mesh: Mesh) -> str:
    return mesh.url + "/v1/completions"


def streaming_chat_maker(
    mesh: Mesh,
    session: aiohttp.ClientSession,
    *,
    max_tokens: int,
    seed: int = 0,
    timeout: float = STREAM_TIMEOUT,
    **extra: Any,
) -> Callable[[int], Awaitable[StreamResult]]:
    """Request i: the shared system prompt plus a short random question, streamed."""
    rng = random.Random(seed)

    async def make(i: int) -> StreamResult:
        question = f"Question {i}: {random_prompt(rng, 6)}?"
        body = chat_body(question, max_tokens, system=SYSTEM, **extra)
        return await stream_request(
            session, chat_url(mesh), body, headers=mesh.headers, timeout=timeout
        )

    return make


async def cached_tokens_of(mesh: Mesh, session: aiohttp.ClientSession, body: dict[str, Any]) -> int:
    result = await stream_request(session, chat_url(mesh), body, headers=mesh.headers)
    assert result.outcome == "completed", f"probe failed: {result}"
    return result.cached_tokens


def wait_redis_synced(mesh: Mesh, timeout: float = 30.0) -> None:
    """kvmanager is connected to Redis and its write-behind queue is empty."""
    wait_for(
        lambda: (s := mesh.stats()).redis_connected and s.redis_pending_writes == 0,
        timeout,
        "kvmanager's Redis write-behind to drain",
    )


def wait_request_ok(mesh: Mesh, timeout: float = 90.0) -> float:
    """Poll with a tiny non-streaming chat until one succeeds; returns the monotonic time of the
    first success (the moment serving is back)."""
    body = json.dumps(chat_body("Name one station.", 2, system=SYSTEM, stream=False)).encode()

    def ok() -> float:
        req = urllib.request.Request(
            chat_url(mesh),
            data=body,
            headers={"Content-Type": "application/json", **mesh.headers},
        )
        with urllib.request.urlopen(req, timeout=30) as resp:
            return time.monotonic() if resp.status == 200 else 0.0

    return wait_for(ok, timeout, "a request to complete", interval=0.25)


T = TypeVar("T")


async def async_wait_for(
    probe: Callable[[], Awaitable[T]], timeout: float, what: str, interval: float = 0.25
) -> T:
    """Await `probe` until it returns something truthy; exceptions count as 'not yet'."""
    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    while True:
        try:
            value = await probe()
            if value:
                return value
        except Exception as exc:
            last = exc
        if time.monotonic() >= deadline:
            raise TimeoutError(
                f"timed out after {timeout:.0f}s waiting for {what} (last: {last!r})"
            )
        await asyncio.sleep(interval)
