"""What the executor's token path costs per step, and whether the readers keep up: the real
EngineLoop and Executor gRPC service in one process, an engine that makes one token per request
per step (no model: host work only), and K Serve streams over loopback gRPC read by a second
process (as K gateway workers would), 256 requests in all.

    python benchmarks/fanout_bench.py [--streams 1,8] [--step-ms 4] [--window 4]

Per K, one JSON line: the executor process's CPU per step, steps per second, and the tokens per
second the readers received. `--step-ms 0` runs the engine as fast as the host allows, so the
readers fall behind: what the executor does with a reader that is behind (Sink in
services/executor/server.py) shows in what they receive and in what it holds.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing as mp
import sys
import time

import _repo  # noqa: F401  (first: the checkout's benchmarks/ and tests/ by name)
import grpc
from pagemesh.proto import executor_pb2 as pb
from pagemesh.proto import executor_pb2_grpc as pb_grpc
from pagemesh.proto.serve_metadata import STEP_COLUMNS
from pagemesh.services.executor.engine_api import FinishReason, SequenceOutput

REQUESTS = 256


class TokenEngine:
    """One plain token per live request per step, after `step_s` of 'device' time."""

    def __init__(self, step_s: float) -> None:
        self.live: dict[str, int] = {}
        self.step_s = step_s
        self.steps = 0

    def add_request(
        self, rid: str, prompt: list[int], params: object, cache_salt: str = ""
    ) -> None:
        self.live[rid] = 0

    def abort_request(self, rid: str) -> None:
        self.live.pop(rid, None)

    def abort_choices(self, rid: str, indices: list[int]) -> None:
        pass

    def has_unfinished_requests(self) -> bool:
        return bool(self.live)

    async def step(self) -> list[SequenceOutput]:
        if self.step_s:
            await asyncio.sleep(self.step_s)
        self.steps += 1
        token = self.steps % 49_000
        return [SequenceOutput(rid, 0, [token], FinishReason.NONE, [], 100, 0) for rid in self.live]


def executor_main(port: int, step_s: float, window: float, report: mp.Queue) -> None:
    from pagemesh.services.executor.server import serve

    async def run() -> None:
        engine = TokenEngine(step_s)
        info = pb.ExecutorInfo(
            executor_id="fanout", model="none", block_size=16, num_blocks=1, max_model_len=1 << 20
        )
        stop = asyncio.Event()
        server = asyncio.create_task(serve(engine, info, "127.0.0.1", port, stop))
        while len(engine.live) < REQUESTS:
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.5)  # past the start
        report.put("start")
        cpu0, steps0, t0 = time.process_time(), engine.steps, time.perf_counter()
        await asyncio.sleep(window)
        cpu1, steps1, t1 = time.process_time(), engine.steps, time.perf_counter()
        report.put((cpu1 - cpu0, steps1 - steps0, t1 - t0))
        stop.set()
        await asyncio.wait_for(server, 10)

    asyncio.run(run())


def readers_main(port: int, streams: int, received: mp.Value) -> None:
    async def one(j: int) -> None:
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        stub = pb_grpc.ExecutorStub(channel)

        async def up():
            for i in range(REQUESTS // streams):
                yield pb.ServeRequest(
                    generate=pb.GenerateRequest(
                        request_id=f"s{j}-{i}",
                        prompt_token_ids=[1, 2, 3],
                        params=pb.SamplingParams(max_tokens=1 << 20),
                    )
                )
            await asyncio.Event().wait()  # keep the stream open

        call = stub.Serve(up(), metadata=(STEP_COLUMNS,), wait_for_ready=True)
        async for msg in call:
            with received.get_lock():
                received.value += len(msg.token_ids) + sum(len(o.token_ids) for o in msg.outputs)

    async def run() -> None:
        await asyncio.gather(*(one(j) for j in range(streams)))

    with contextlib.suppress(grpc.aio.AioRpcError, KeyboardInterrupt):  # the executor stopped
        asyncio.run(run())


def measure(streams: int, step_ms: float, window: float) -> dict[str, object]:
    from pagemesh.redis_process import free_port

    port = free_port()
    report: mp.Queue = mp.Queue()
    received = mp.Value("q", 0)
    executor = mp.Process(target=executor_main, args=(port, step_ms / 1e3, window, report))
    executor.start()
    readers = mp.Process(target=readers_main, args=(port, streams, received), daemon=True)
    readers.start()
    try:
        assert report.get(timeout=120) == "start"
        got0 = received.value
        cpu, steps, elapsed = report.get(timeout=window + 60)
        got1 = received.value
    finally:
        executor.join(15)
        readers.terminate()
        readers.join(5)
    return {
        "bench": "executor_fanout",
        "streams": streams,
        "requests": REQUESTS,
        "step_ms": step_ms,
        "executor_cpu_us_per_step": round(cpu / steps * 1e6, 1),
        "steps_per_s": round(steps / elapsed, 1),
        "tokens_made_per_s": round(steps * REQUESTS / elapsed),
        "tokens_received_per_s": round((got1 - got0) / elapsed),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--streams", default="1,8", help="Serve streams, comma-separated")
    ap.add_argument("--step-ms", type=float, default=4.0, help="the engine's 'device' time")
    ap.add_argument("--window", type=float, default=4.0, help="seconds measured per run")
    args = ap.parse_args()
    for k in (int(x) for x in args.streams.split(",") if x):
        print(json.dumps(measure(k, args.step_ms, args.window)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
