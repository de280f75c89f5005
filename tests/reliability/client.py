"""HTTP clients for the reliability tests: SSE streams classified as completed, failed cleanly or
lost, and load generators with bounded counts and deadlines."""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp

COMPLETED = "completed"
CLEAN_ERROR = "clean_error"  # an error status with an error object, or an SSE error event
LOST = "lost"  # hung past the bound, reset without an error event, truncated, or garbled


@dataclass
class StreamResult:
    status: int = 0
    outcome: str = LOST
    text: str = ""
    finish_reason: str | None = None
    error: Any = None
    done: bool = False
    usage: dict[str, Any] | None = None
    chunks: int = 0
    started: float = 0.0  # time.monotonic() when it was sent
    elapsed: float = 0.0
    detail: str = ""
    worker: str = ""  # the gateway process that answered (x-pagemesh-worker); "" if none did

    @property
    def ended(self) -> float:
        return self.started + self.elapsed

    @property
    def cached_tokens(self) -> int:
        details = (self.usage or {}).get("prompt_tokens_details") or {}
        return int(details.get("cached_tokens") or 0)


def _classify(result: StreamResult) -> str:
    if result.error is not None:
        return CLEAN_ERROR
    if result.status == 200 and result.finish_reason is not None and result.done:
        return COMPLETED
    return LOST


def chat_body(
    content: str,
    max_tokens: int,
    *,
    system: str | None = None,
    stream: bool = True,
    **extra: Any,
) -> dict[str, Any]:
    messages = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": content})
    body: dict[str, Any] = {
        "model": "smollm2",
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": stream,
    }
    if stream:
        body["stream_options"] = {"include_usage": True}
    body.update(extra)
    return body


async def stream_request(
    session: aiohttp.ClientSession,
    url: str,
    body: dict[str, Any],
    *,
    headers: dict[str, str] | None = None,
    timeout: float = 60.0,
    stop_after_chunks: int | None = None,
    progress: asyncio.Event | None = None,
    progress_after: int = 1,
) -> StreamResult:
    """POST a streaming request and read its SSE events to the end (or to `stop_after_chunks`,
    when the connection is dropped on purpose: a client disconnect). `progress` is set once
    `progress_after` chunks have come (a test that must act mid-stream waits on it)."""
    result = StreamResult()
    t0 = result.started = time.monotonic()
    try:
        async with asyncio.timeout(timeout):
            async with session.post(url, json=body, headers=headers) as resp:
                result.status = resp.status
                result.worker = resp.headers.get("X-Pagemesh-Worker", "")
                if resp.status != 200 or "text/event-stream" not in resp.headers.get(
                    "Content-Type", ""
                ):
                    raw = await resp.read()
                    _read_plain(result, raw)
                    return result
                buffer = b""
                async for piece in resp.content.iter_any():
                    buffer += piece
                    while b"\n\n" in buffer:
                        frame, buffer = buffer.split(b"\n\n", 1)
                        _read_event(result, frame)
                    if progress is not None and result.chunks >= progress_after:
                        progress.set()
                    if stop_after_chunks is not None and result.chunks >= stop_after_chunks:
                        resp.close()  # drop the TCP connection mid-stream
                        result.detail = "disconnected on purpose"
                        return result
                if buffer.strip():
                    result.detail = f"trailing bytes without a frame end: {buffer[:80]!r}"
    except TimeoutError:
        result.detail = f"no end within {timeout:.0f}s"
    except aiohttp.ClientError as exc:
        result.detail = f"{type(exc).__name__}: {exc}"
    except ValueError as exc:  # garbled JSON in an event
        result.detail = f"bad event: {exc}"
    finally:
        result.elapsed = time.monotonic() - t0
        result.outcome = _classify(result)
    return result


def _read_plain(result: StreamResult, raw: bytes) -> None:
    try:
        payload = json.loads(raw)
    except ValueError:
        result.detail = f"status {result.status}, non-JSON body {raw[:120]!r}"
        return
    if isinstance(payload, dict) and isinstance(payload.get("error"), dict):
        result.error = payload["error"]
        return
    if result.status == 200 and isinstance(payload, dict):
        # A non-streaming answer.
        choice = (payload.get("choices") or [{}])[0]
        message = choice.get("message") or {}
        result.text = message.get("content") or choice.get("text") or ""
        result.finish_reason = choice.get("finish_reason")
        result.usage = payload.get("usage")
        result.done = True
        return
    result.detail = f"status {result.status} without an error object: {raw[:120]!r}"


def _read_event(result: StreamResult, frame: bytes) -> None:
    for line in frame.split(b"\n"):
        if not line.startswith(b"data: "):
            continue
        data = line[6:]
        if data == b"[DONE]":
            result.done = True
            continue
        event = json.loads(data)
        if "error" in event:
            result.error = event["error"]
            continue
        if event.get("usage"):
            result.usage = event["usage"]
        for choice in event.get("choices") or []:
            result.chunks += 1
            delta = choice.get("delta") or {}
            result.text += delta.get("content") or choice.get("text") or ""
            if choice.get("finish_reason"):
                result.finish_reason = choice["finish_reason"]


@dataclass
class LoadReport:
    results: list[StreamResult] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)
    finished: float = 0.0

    def counts(self) -> Counter[str]:
        return Counter(r.outcome for r in self.results)

    def figures(self) -> dict[str, float]:
        """Counts for RESULTS.md: failures split into streams cut by an error event after they
        had started, and requests refused up front (an error status) while the fault lasted."""
        c = self.counts()
        mid = sum(1 for r in self.results if r.outcome == CLEAN_ERROR and r.status == 200)
        return {
            "requests": len(self.results),
            "completed": c[COMPLETED],
            "failed_cleanly": c[CLEAN_ERROR],
            "failed_mid_stream": mid,
            "refused": c[CLEAN_ERROR] - mid,
            "lost": c[LOST],
            "slowest_s": round(max((r.elapsed for r in self.results), default=0.0), 1),
        }

    def lost(self) -> list[StreamResult]:
        return [r for r in self.results if r.outcome == LOST]

    def summary(self) -> str:
        c = self.counts()
        worst = max((r.elapsed for r in self.results), default=0.0)
        return (
            f"{len(self.results)} requests: {c[COMPLETED]} completed, {c[CLEAN_ERROR]} failed "
            f"cleanly, {c[LOST]} lost; slowest {worst:.1f}s"
        )

    def examples(self, outcome: str, n: int = 5) -> list[str]:
        return [
            f"status={r.status} detail={r.detail!r} error={r.error!r} chunks={r.chunks} "
            f"elapsed={r.elapsed:.1f}s"
            for r in self.results
            if r.outcome == outcome
        ][:n]


async def run_load(
    make_request: Callable[[int], Awaitable[StreamResult]],
    *,
    concurrency: int,
    total: int | None = None,
    duration: float | None = None,
    stop: asyncio.Event | None = None,
    error_pause: float = 1.0,
) -> LoadReport:
    """`concurrency` workers issue requests until `total` have been sent, `duration` seconds have
    passed, or `stop` is set, whichever comes first (at least one of them must bound it).

    A worker whose request failed waits `error_pause` before the next, as a real client backs
    off: a fault that fails requests instantly would otherwise turn the load into a busy loop."""
    assert total is not None or duration is not None, "an unbounded load loop"
    report = LoadReport()
    deadline = time.monotonic() + duration if duration is not None else float("inf")
    counter = iter(range(total if total is not None else 10**9))

    async def worker() -> None:
        for i in counter:
            if time.monotonic() >= deadline or (stop is not None and stop.is_set()):
                return
            result = await make_request(i)
            report.results.append(result)
            if result.outcome != COMPLETED:
                await asyncio.sleep(error_pause)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    report.finished = time.monotonic()
    return report


def session(limit: int = 512) -> aiohttp.ClientSession:
    # No pooled keep-alive reuse across tests, and enough connections for the storms.
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=limit, force_close=True))


WORDS = [
    "alpha",
    "bravo",
    "charlie",
    "delta",
    "echo",
    "foxtrot",
    "golf",
    "hotel",
    "india",
    "juliet",
    "kilo",
    "lima",
    "mike",
    "november",
    "oscar",
    "papa",
    "quebec",
    "romeo",
    "sierra",
    "tango",
    "uniform",
    "victor",
    "whiskey",
    "xray",
    "yankee",
    "zulu",
]


def random_prompt(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words))
