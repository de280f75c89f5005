"""kvmanager benchmark: prints one JSON line.

The client is pagemesh.services.kvmanager.client.KVManagerClient, as the executor uses it: hot calls over
its Session stream (the default); the `unary_*` figures are the same calls as unary RPCs.

- Allocate latency (p50/p99) over loopback gRPC: 512-token prompts, half of them sharing a
  256-token prefix (prefix hits), released in batches off the clock;
- a 256-sequence Extend (one decode step of a 256-sequence batch) over loopback gRPC: "decode"
  steps grow every sequence by one token (about 1 in 16 needs a block), "all_grow" steps give
  every sequence a new block;
- the same Extend with Redis write-behind on (the persistence is not on the request path);
- CPU per decode-step Extend, client and server process (user + system): unlike latencies,
  barely inflated by other tenants of a shared machine (the server's includes its
  write-behind work when Redis is on);
- in-process throughput: raw block allocations + frees per second (BlockPool), and Manager
  allocate+release of 16-block sequences (blocks per second).

The server runs as a separate process (`pagemesh kvmanager`), as in production.
Usage: python benchmarks/kvmanager_bench.py [--quick] [--no-redis]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import subprocess
import sys
import time

import _repo  # the checkout's benchmarks/ and tests/ by name (see _repo.py)
import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from pagemesh.services.kvmanager.api import ExtendEntry
from pagemesh.services.kvmanager.block_pool import BlockPool
from pagemesh.services.kvmanager.client import KVManagerClient
from pagemesh.services.kvmanager.manager import Manager

from pagemesh.redis_process import RedisProcess, free_port

BS = 16


def pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return round(s[min(len(s) - 1, int(q * len(s)))] * 1e6, 1)  # microseconds


def spawn(
    port: int, redis_url: str | None, extra_args: list[str] | None = None
) -> subprocess.Popen:
    cmd = [
        sys.executable,
        "-P",
        "-m",
        "pagemesh.services.kvmanager.cli",
        "kvmanager",
        "--port",
        str(port),
    ]
    cmd += ["--metrics-port", "0", "--log-level", "warning"]
    if redis_url:
        cmd += ["--redis-url", redis_url]
    return subprocess.Popen([*cmd, *(extra_args or [])], cwd=_repo.ROOT)


async def wait_ready(port: int) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        for _ in range(400):
            try:
                await stub.Check(health_pb2.HealthCheckRequest(), timeout=0.5)
                return
            except grpc.aio.AioRpcError:
                await asyncio.sleep(0.05)
    raise TimeoutError("kvmanager did not start")


def proc_cpu(pid: int) -> float:
    """CPU seconds (user + system) a process has used: a figure the other tenants of a shared
    machine do not inflate the way they inflate latencies."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def bench_grpc(port: int, pid: int, n_alloc: int, n_steps: int, session: bool = True) -> dict:
    c = KVManagerClient(f"127.0.0.1:{port}", f"bench-{session}", use_session=session)
    await c.register(1 << 18, BS, "bench-model")
    rng = random.Random(0)
    shared = [rng.randrange(32000) for _ in range(256)]
    # Allocate latency.
    lat = []
    live: list[str] = []
    for i in range(n_alloc + 50):
        tail = [rng.randrange(32000) for _ in range(256)]
        prompt = (shared if i % 2 else [rng.randrange(32000) for _ in range(256)]) + tail
        t0 = time.perf_counter()
        await c.allocate(f"a{i}", prompt, num_lookahead_tokens=BS)
        dt = time.perf_counter() - t0
        if i >= 50:  # warm-up
            lat.append(dt)
        if i == 0:  # publish the shared prefix, as an executor would after prefill
            from pagemesh.services.kvmanager.api import CommitEntry

            await c.commit([CommitEntry("a0", b, prompt[b * BS : (b + 1) * BS]) for b in range(16)])
        live.append(f"a{i}")
        if len(live) == 64:
            await c.release(live)
            live = []
    if live:
        await c.release(live)
    out = {"allocate_512tok_p50_us": pct(lat, 0.5), "allocate_512tok_p99_us": pct(lat, 0.99)}
    # 256-sequence Extend.
    seqs = [f"s{i}" for i in range(256)]
    lens = {}
    for s in seqs:
        n = rng.randrange(100, 400)
        await c.allocate(s, [rng.randrange(32000) for _ in range(n)])
        lens[s] = n
    dec = []
    client_cpu = 0.0
    for step in range(n_steps + 20):
        if step == 20:
            server_cpu0 = proc_cpu(pid)
        entries = [ExtendEntry(s, lens[s], lens[s] + 1) for s in seqs]
        c0 = time.process_time()
        t0 = time.perf_counter()
        await c.extend(entries)
        dt = time.perf_counter() - t0
        if step >= 20:
            dec.append(dt)
            client_cpu += time.process_time() - c0
        for s in seqs:
            lens[s] += 1
    await asyncio.sleep(0.05)  # let the write-behind of the last steps finish
    server_cpu = proc_cpu(pid) - server_cpu0
    grow = []
    for _ in range(max(20, n_steps // 4)):
        # Every sequence crosses into a new block: 256 fresh blocks per call.
        entries = []
        for s in seqs:
            target = (lens[s] // BS + 1) * BS + 1
            entries.append(ExtendEntry(s, lens[s], target))
            lens[s] = target
        t0 = time.perf_counter()
        r = await c.extend(entries)
        grow.append(time.perf_counter() - t0)
        assert len(r.updates) == 256
    await c.release(seqs)
    out.update(
        extend_256seq_decode_p50_us=pct(dec, 0.5),
        extend_256seq_decode_p99_us=pct(dec, 0.99),
        extend_256seq_decode_client_cpu_us=round(client_cpu / len(dec) * 1e6, 1),
        extend_256seq_decode_server_cpu_us=round(server_cpu / len(dec) * 1e6, 1),
        extend_256seq_all_grow_p50_us=pct(grow, 0.5),
        extend_256seq_all_grow_p99_us=pct(grow, 0.99),
    )
    st = await c.get_stats()
    out["redis_connected"] = st.redis_connected
    await c.close()
    return out


def bench_inprocess(seconds: float) -> dict:
    # Raw pool: one block allocated and freed per op pair.
    pool = BlockPool(1 << 16)
    take, decref = pool.take, pool.decref
    n = 0
    t_end = time.perf_counter() + seconds
    t0 = time.perf_counter()
    while time.perf_counter() < t_end:
        bs = [take() for _ in range(1000)]
        for b in bs:
            decref(b)
        n += 1000
    raw = n / (time.perf_counter() - t0)
    # Manager: allocate + release of 256-token (16-block) sequences, no prefix hits.
    m = Manager()
    m.register("ex", 1 << 16, BS, "fp")
    prompts = [[random.randrange(32000) for _ in range(255)] for _ in range(64)]
    n = i = 0
    t_end = time.perf_counter() + seconds
    t0 = time.perf_counter()
    while time.perf_counter() < t_end:
        ids = []
        for p in prompts:
            i += 1
            m.allocate("ex", 1, f"x{i}", p, "", 1)
            ids.append(f"x{i}")
        m.release("ex", 1, ids)
        n += 16 * len(prompts)
    seq = n / (time.perf_counter() - t0)
    return {
        "inprocess_block_alloc_free_per_s": round(raw),
        "inprocess_seq16_alloc_release_blocks_per_s": round(seq),
        "inprocess_seq16_alloc_release_seqs_per_s": round(seq / 16),
    }


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--no-redis", action="store_true")
    args = ap.parse_args()
    n_alloc, n_steps = (200, 200) if args.quick else (2000, 1000)
    result: dict = {"bench": "kvmanager", "block_size": BS}
    port = free_port()
    proc = spawn(port, None)
    try:
        await wait_ready(port)
        result.update(await bench_grpc(port, proc.pid, n_alloc, n_steps, session=True))
        r = await bench_grpc(port, proc.pid, n_alloc // 2, n_steps // 2, session=False)
        result.update({f"unary_{k}": v for k, v in r.items() if k != "redis_connected"})
    finally:
        proc.terminate()
        proc.wait()
    if not args.no_redis:
        redis = RedisProcess().start()
        port = free_port()
        proc = spawn(port, redis.url)
        try:
            await wait_ready(port)
            r = await bench_grpc(port, proc.pid, n_alloc // 2, n_steps // 2)
            result.update({f"with_redis_{k}": v for k, v in r.items()})
        finally:
            proc.terminate()
            proc.wait()
            redis.cleanup()
    result.update(bench_inprocess(1.0 if args.quick else 3.0))
    import google.protobuf

    result.update(
        python=platform.python_version(),
        grpcio=grpc.__version__,
        protobuf=google.protobuf.__version__,
        cpus=os.cpu_count(),
        loadavg_1min_at_end=os.getloadavg()[0],
    )
    print(json.dumps(result))


if __name__ == "__main__":
    asyncio.run(main())
