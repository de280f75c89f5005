"""Ctrl-C on `pagemesh up` under load loses nothing: a terminal's SIGINT goes to the whole
foreground process group, which must not include Redis; the services stop gateway first, then
the executor (its last commits sent), then kvmanager with its final flush, and Redis last. Every
index entry and hit counter written before the signal is in Redis afterwards (entry by entry),
and after a fresh start the index hits again."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import grpc
import psutil
import pytest
from pagemesh.proto import kvmanager_pb2, kvmanager_pb2_grpc
from pagemesh.services.kvmanager.redis_records import DEFAULT_PREFIX, Keys, decode_stats

from pagemesh.redis_process import RedisProcess, free_port
from tests.e2e.test_up import Output
from tests.reliability.client import COMPLETED, StreamResult, chat_body, session, stream_request
from tests.support.mesh import REPO_ROOT, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

MODEL = "SmolLM2-135M-Instruct"
SYSTEM = "You answer questions about the stations of a small railway line, in one sentence."


class Up:
    """`pagemesh up` in its own process group, as a terminal runs it."""

    def __init__(self, tmp: Path, model: Path, ports: dict[str, int]) -> None:
        self.ports = ports
        argv = [sys.executable, "-P", "-m", "pagemesh.cli", "up", "--model", str(model)]
        argv += ["--model-name", MODEL, "--device", "cpu", "--num-blocks", "1024"]
        argv += ["--port", str(ports["http"]), "--kv-port", str(ports["kv"])]
        argv += ["--executor-port", str(ports["executor"]), "--kv-metrics-port", "0"]
        argv += ["--redis-port", str(ports["redis"]), "--data-dir", str(tmp / "redis")]
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "CUDA_VISIBLE_DEVICES": ""}
        env.pop("PAGEMESH_API_KEY", None)
        self.proc = subprocess.Popen(
            argv,
            cwd=REPO_ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own group: the test plays the terminal
        )
        self.out = Output(self.proc)
        try:
            wait_for(lambda: self.out.has("pagemesh is up"), 300, "pagemesh up", interval=0.5)
        except TimeoutError as exc:
            self.kill()
            raise AssertionError(f"{exc}\n{self.out.tail()}") from None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.ports['http']}/v1/chat/completions"

    def ctrl_c(self) -> None:
        os.killpg(self.proc.pid, signal.SIGINT)

    def kill(self) -> None:
        if self.proc.poll() is None:
            for child in psutil.Process(self.proc.pid).children(recursive=True):
                child.kill()
            self.proc.kill()
        self.proc.wait()


def _stats(kv: str) -> kvmanager_pb2.GetStatsResponse:
    with grpc.insecure_channel(kv) as channel:
        stub = kvmanager_pb2_grpc.KVManagerStub(channel)
        return stub.GetStats(kvmanager_pb2.GetStatsRequest(), timeout=2)


def _totals(reply: kvmanager_pb2.GetStatsResponse) -> tuple[int, int, int, int]:
    (w,) = [w for w in reply.windows if w.name == "since_start"]
    h = w.hits
    return h.query_tokens, h.hit_tokens, h.query_requests, h.hit_requests


def _index(redis_url: str, reply: kvmanager_pb2.GetStatsResponse) -> dict[bytes, bytes]:
    """The prefix index entries Redis holds for the executor's epoch."""
    import redis

    (ex,) = reply.executors
    client = redis.Redis.from_url(redis_url, socket_timeout=5)
    try:
        key = Keys(DEFAULT_PREFIX).epoch(ex.executor_id, ex.epoch, "index")
        return dict(client.hgetall(key))
    finally:
        client.close()


def _redis_totals(redis_url: str) -> tuple[int, int, int, int]:
    import redis

    client = redis.Redis.from_url(redis_url, socket_timeout=5)
    try:
        return decode_stats(client.hgetall(Keys(DEFAULT_PREFIX).top("stats")))["*"]
    finally:
        client.close()


async def _load(up: Up, stop: asyncio.Event) -> list[StreamResult]:
    """8 clients streaming distinct prompts until `stop` (each one's prompt is committed)."""
    results: list[StreamResult] = []
    counter = iter(range(10**6))

    async def client(http: Any) -> None:
        for i in counter:
            if stop.is_set():
                return
            body = chat_body(f"Question {i}: which station is number {i}?", 12, system=SYSTEM)
            body["model"] = MODEL
            results.append(await stream_request(http, up.url, body, timeout=60))

    async with session() as http:
        await asyncio.gather(*(client(http) for _ in range(8)))
    return results


def test_ctrl_c_under_load_loses_nothing(tmp_path: Path, smollm2_path: Path) -> None:
    ports = {k: free_port() for k in ("http", "kv", "executor", "redis")}
    kv = f"127.0.0.1:{ports['kv']}"
    redis_url = f"redis://127.0.0.1:{ports['redis']}/0"
    up = Up(tmp_path, smollm2_path, ports)
    try:

        async def run() -> tuple[list[StreamResult], dict[bytes, bytes], Any, Any]:
            stop = asyncio.Event()
            load = asyncio.create_task(_load(up, stop))
            await asyncio.sleep(8)  # some requests done, others in every phase
            at_signal = await asyncio.to_thread(_stats, kv)
            index_at_signal = await asyncio.to_thread(_index, redis_url, at_signal)
            up.ctrl_c()
            stop.set()
            # kvmanager's own figures until it is gone: the last answer is the latest state.
            last = at_signal
            while True:
                try:
                    last = await asyncio.to_thread(_stats, kv)
                except grpc.RpcError:
                    break
                await asyncio.sleep(0.05)
            return await load, index_at_signal, at_signal, last

        results, index_at_signal, at_signal, last = asyncio.run(run())
        assert up.proc.wait(timeout=120) == 0, up.out.tail()
    except BaseException:
        up.kill()
        raise

    lines = up.out.lines
    text = up.out.tail(400)
    for bad in ("final flush failed", "unreachable", "Traceback"):
        assert not any(bad in line for line in lines), f"{bad!r} at shutdown:\n{text}"
    order = [
        next(i for i, line in enumerate(lines) if f"stopping {name}" in line)
        for name in ("gateway", "executor", "kvmanager", "redis")
    ]
    assert order == sorted(order), f"services stopped out of order:\n{text}"

    completed = [r for r in results if r.outcome == COMPLETED]
    assert len(completed) >= 8, f"too few requests before the signal: {len(completed)}"
    assert _totals(last)[0] >= sum(int(r.usage["prompt_tokens"]) for r in completed if r.usage)

    # Redis alone, after the shutdown: what kvmanager wrote is all there.
    redis = RedisProcess(port=ports["redis"], data_dir=tmp_path / "redis")
    redis.start()
    try:
        index_after = _index(redis_url, at_signal)
        totals_after = _redis_totals(redis_url)
    finally:
        redis.stop()
    assert last.executors[0].pool.evictions == 0  # (no entry may legitimately go)
    missing = {k: v for k, v in index_at_signal.items() if index_after.get(k) != v}
    assert not missing, f"{len(missing)} of {len(index_at_signal)} index entries lost"
    assert len(index_after) >= len(index_at_signal)
    assert totals_after == _totals(last), (
        f"hit counters in Redis {totals_after} != kvmanager's last {_totals(last)}"
    )
    assert totals_after >= _totals(at_signal)

    # A fresh start on the same data: serving, and the prefix index hits again.
    up = Up(tmp_path, smollm2_path, ports)
    try:
        assert up.out.has("restored 1 executor(s)") or up.out.has("restored"), up.out.tail()

        async def probe() -> list[int]:
            body = chat_body("Which station is the last one?", 4, system=SYSTEM)
            body["model"] = MODEL
            async with session() as http:
                return [
                    (await stream_request(http, up.url, body, timeout=60)).cached_tokens
                    for _ in range(2)
                ]

        first, second = asyncio.run(probe())
        assert second > 0, f"no prefix hit after the restart ({first}, {second})"
        up.ctrl_c()
        assert up.proc.wait(timeout=120) == 0, up.out.tail()
        time.sleep(0.2)
    finally:
        up.kill()
