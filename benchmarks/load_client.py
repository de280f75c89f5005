"""The serving benchmark's client side: streaming chat requests, sent from worker processes.

One Python process is not a neutral client of a loaded mesh: parsing ~35k SSE events/s takes
most of a core, and a burst of 128 requests leaves it only after 20-30 ms of json encoding and
connecting in one event loop, time that TTFT then counts against the server. So serve_bench
drives each run from a `ClientPool` of worker processes, started once per invocation: every
worker gets whole conversations with their arrival offsets, serializes its first-turn bodies and
opens its keep-alive connections ahead of time, reports ready, and on the parent's go sends each
conversation at the common start plus its offset.

Workers are fresh interpreters that import only this module, benchmarks.workloads and aiohttp
(no torch: the parent may hold CUDA). Not multiprocessing's spawn: it re-runs the parent's main
script in every child (a scratch script without a main guard would start its mesh again), and
fails outright for a script read from stdin.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import signal
import socket
import subprocess
import time
import traceback
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import _repo
import aiohttp

from benchmarks import workloads
from benchmarks.workloads import Conversation

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CLIENT_PROCS = 4
JSON_HEADERS = {"Content-Type": "application/json"}
# Connections a worker opens before a run: one per conversation that may be in flight at once.
MAX_PREOPENED = 256
# From the parent's go to the common start: the go must reach every worker (a socket write and
# a thread wake-up, well under a millisecond) before the first conversation is due.
GO_MARGIN_S = 0.01
READY = "ready"
# What a worker's socket raises once the parent has closed its end: the pool is shutting down.
POOL_CLOSED = (EOFError, BrokenPipeError, ConnectionResetError)


@dataclass(slots=True)
class RequestResult:
    ok: bool
    # time.perf_counter() just before the send: CLOCK_MONOTONIC on Linux, one clock for every
    # process of the host, so requests from different workers order by arrival.
    sent_at: float = 0.0
    ttft: float = 0.0
    output_tokens: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    token_times: list[float] = field(default_factory=list)  # seconds after sent_at
    error: str = ""
    text: str = ""
    # The gateway's id of the request (its X-Request-Id response header): what its
    # --trace-requests line is found by (benchmarks/ttft_breakdown.py).
    request_id: str = ""


@dataclass(slots=True)
class Exchange:
    """One request: the messages it sent (for the theoretical hit rate) and what came back."""

    messages: list[dict[str, str]]
    result: RequestResult


@dataclass(slots=True)
class Share:
    """One worker's part of a run: whole conversations, in arrival order."""

    url: str
    model: str
    convs: list[Conversation]
    offsets: list[float]  # each conversation's first send, in seconds after the common start


@dataclass(slots=True)
class ShareReport:
    exchanges: list[Exchange]
    cpu_s: float  # the worker's CPU seconds from the go to its last response's end
    end: float  # perf_counter when its last response ended


@dataclass(slots=True)
class WorkerFailed:
    traceback: str


class ClientPoolError(RuntimeError):
    """A client worker raised; the message holds its traceback."""


def client_session() -> aiohttp.ClientSession:
    # No connection limit: every request in flight has a connection of its own, as it would
    # from independent clients.
    return aiohttp.ClientSession(
        timeout=aiohttp.ClientTimeout(total=None, sock_read=600),
        connector=aiohttp.TCPConnector(limit=0),
    )


def request_body(
    model: str, conv: Conversation, turn: int, messages: list[dict[str, str]]
) -> bytes:
    return json.dumps(
        {
            "model": model,
            "messages": messages,
            "max_tokens": conv.turns[turn].max_tokens,
            "n": conv.n,
            "stream": True,
            "stream_options": {"include_usage": True},
            "ignore_eos": True,
            "temperature": 0.0,
            **conv.extra,
        }
    ).encode()


def first_turn_body(model: str, conv: Conversation) -> bytes:
    return request_body(model, conv, 0, workloads.messages_for(conv, 0, []))


async def stream_chat(session: aiohttp.ClientSession, url: str, body: bytes) -> RequestResult:
    """One streaming chat request; TTFT runs from just before the send to the first non-empty
    content delta. Keeps the text of choice 0 (a multi-turn conversation's next history)."""
    result = RequestResult(ok=False, sent_at=time.perf_counter())
    text: list[str] = []
    try:
        async with session.post(
            f"{url}/v1/chat/completions", data=body, headers=JSON_HEADERS
        ) as resp:
            result.request_id = resp.headers.get("X-Request-Id", "")
            if resp.status != 200:
                result.error = f"HTTP {resp.status}: {(await resp.text())[:200]}"
                return result
            async for raw in resp.content:
                line = raw.decode().strip()
                if not line.startswith("data: "):
                    continue
                payload = line[6:]
                if payload == "[DONE]":
                    break
                chunk = json.loads(payload)
                if "error" in chunk:
                    result.error = str(chunk["error"])
                    return result
                now = time.perf_counter() - result.sent_at
                for choice in chunk.get("choices", []):
                    content = choice.get("delta", {}).get("content")
                    if content:
                        if not result.token_times:
                            result.ttft = now
                        result.token_times.append(now)
                        if choice["index"] == 0:
                            text.append(content)
                usage = chunk.get("usage")
                if usage:
                    result.output_tokens = usage["completion_tokens"]
                    result.prompt_tokens = usage["prompt_tokens"]
                    details = usage.get("prompt_tokens_details") or {}
                    result.cached_tokens = details.get("cached_tokens") or 0
    except (TimeoutError, aiohttp.ClientError) as exc:
        result.error = repr(exc)
        return result
    result.text = "".join(text)
    result.ok = True
    return result


async def run_conversation(
    session: aiohttp.ClientSession, url: str, model: str, conv: Conversation, first_body: bytes
) -> list[Exchange]:
    """Every turn in order, each re-sending the history with the replies so far; stops at the
    first failed turn."""
    exchanges: list[Exchange] = []
    replies: list[str] = []
    for t in range(len(conv.turns)):
        messages = workloads.messages_for(conv, t, replies)
        body = first_body if t == 0 else request_body(model, conv, t, messages)
        result = await stream_chat(session, url, body)
        exchanges.append(Exchange(messages, result))
        if not result.ok:
            break
        replies.append(result.text)
    return exchanges


def arrival_offsets(count: int, rate: float, seed: int) -> list[float]:
    """When each of `count` conversations starts, in seconds after the first: all at once for a
    burst (rate inf), else a Poisson process of `rate` per second."""
    if rate == float("inf"):
        return [0.0] * count
    rng = random.Random(seed)
    offsets: list[float] = []
    t = 0.0
    for _ in range(count):
        offsets.append(t)
        t += rng.expovariate(rate)
    return offsets


async def _preopen(session: aiohttp.ClientSession, url: str, count: int) -> None:
    """`count` keep-alive connections in the session's pool, so that no request of the run waits
    on a TCP handshake. A failure here is left to the run's own requests to report."""

    async def one() -> None:
        async with session.get(f"{url}/v1/models") as resp:
            await resp.read()

    await asyncio.gather(*(one() for _ in range(count)), return_exceptions=True)


async def _run_share(conn: Connection, share: Share) -> ShareReport:
    bodies = [first_turn_body(share.model, conv) for conv in share.convs]
    async with client_session() as session:
        await _preopen(session, share.url, min(len(share.convs), MAX_PREOPENED))
        conn.send(READY)
        # Waited for on a thread: the loop stays free to notice connections the server closes.
        start: float = await asyncio.to_thread(conn.recv)
        cpu_start = time.process_time()

        async def at_offset(conv: Conversation, body: bytes, offset: float) -> list[Exchange]:
            await asyncio.sleep(start + offset - time.perf_counter())
            return await run_conversation(session, share.url, share.model, conv, body)

        schedule = zip(share.convs, bodies, share.offsets, strict=True)
        done = await asyncio.gather(*(at_offset(*item) for item in schedule))
        end = time.perf_counter()
        cpu_s = time.process_time() - cpu_start
    return ShareReport([e for exchanges in done for e in exchanges], cpu_s, end)


def worker_main(fd: int) -> None:
    """A client worker, talking to its pool over socket `fd`: one share per run until the
    parent closes its end."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    conn = Connection(fd)
    with contextlib.suppress(*POOL_CLOSED):
        while True:
            share = conn.recv()
            try:
                reply: ShareReport | WorkerFailed = asyncio.run(_run_share(conn, share))
            except POOL_CLOSED:
                raise
            except Exception:
                reply = WorkerFailed(traceback.format_exc())
            conn.send(reply)


def _recv(conn: Connection) -> Any:
    message = conn.recv()
    if isinstance(message, WorkerFailed):
        raise ClientPoolError(message.traceback)
    return message


class ClientPool:
    """`procs` client worker processes, started on entering and reused by every run.

    A run is `prepare` (each worker gets its conversations and reports ready), `go` (the common
    start), then `reports`. A pool that raised mid-run is out of step with its workers: leave it.
    """

    def __init__(self, procs: int) -> None:
        if procs < 1:
            raise ValueError(f"a client pool needs at least one process, not {procs}")
        self.procs = procs
        self._conns: list[Connection] = []
        self._workers: list[subprocess.Popen[bytes]] = []

    def __enter__(self) -> ClientPool:
        for _ in range(self.procs):
            ours, theirs = socket.socketpair()
            fd = theirs.fileno()
            code = f"from benchmarks.load_client import worker_main; worker_main({fd})"
            self._workers.append(
                subprocess.Popen(_repo.launcher(code), pass_fds=[fd], cwd=REPO_ROOT)
            )
            theirs.close()
            self._conns.append(Connection(ours.detach()))
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *_: object) -> None:
        for conn in self._conns:
            conn.close()
        for worker in self._workers:
            if exc_type is None:  # an idle worker: the EOF on its socket ends it
                with contextlib.suppress(subprocess.TimeoutExpired):
                    worker.wait(timeout=10)
            worker.kill()  # after an error it may be mid-run, and that run is wanted no more
            worker.wait()
        self._conns.clear()
        self._workers.clear()

    async def prepare(
        self, url: str, model: str, convs: list[Conversation], offsets: list[float]
    ) -> None:
        """Deal the conversations round-robin in arrival order; returns once every worker has
        serialized its bodies and opened its connections."""
        n = self.procs
        shares = [Share(url, model, convs[i::n], offsets[i::n]) for i in range(n)]
        await asyncio.to_thread(self._handshake, shares)

    def _handshake(self, shares: list[Share]) -> None:
        for conn, share in zip(self._conns, shares, strict=True):
            conn.send(share)
        for conn in self._conns:
            if (message := _recv(conn)) != READY:
                raise ClientPoolError(f"a worker answered {message!r} to its share, not ready")

    def go(self) -> float:
        """Start the prepared run; returns its common start (a perf_counter value)."""
        start = time.perf_counter() + GO_MARGIN_S
        for conn in self._conns:
            conn.send(start)
        return start

    async def reports(self) -> list[ShareReport]:
        """Each worker's report, in worker order, once its last conversation has ended."""
        return await asyncio.to_thread(self._collect)

    def _collect(self) -> list[ShareReport]:
        return [_recv(conn) for conn in self._conns]
