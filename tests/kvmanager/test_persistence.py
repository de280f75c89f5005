"""Persistence against a real redis-server: write-behind round trips, epochs, key hygiene,
kill -9 of a kvmanager process with identical state after restart, Redis stopped and restarted
under traffic with no lost index entry."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time

import grpc
import pytest
import redis.asyncio as aioredis
from grpc_health.v1 import health_pb2, health_pb2_grpc
from pagemesh.services.kvmanager.client import KVManagerClient
from pagemesh.services.kvmanager.local import LocalAllocator
from pagemesh.services.kvmanager.manager import Manager
from pagemesh.services.kvmanager.persistence import MAX_DEFER_S, QUIET_S, Persistence
from pagemesh.services.kvmanager.server import REDIS_HEALTH, start_server

from pagemesh.redis_process import RedisProcess, free_port
from tests.kvmanager.workload import Workload

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


async def restored_snapshot(url: str, prefix: str = "pagemesh:kv:") -> dict:
    """What a kvmanager starting now would hold: a fresh core restored from Redis."""
    m = Manager(track_changes=True)
    p = Persistence(m, url, prefix=prefix)
    await p.restore()
    await p.redis.aclose()
    m.check()
    return m.snapshot()


async def run_ops(w: Workload, allocs: list, n: int) -> None:
    for _ in range(n):
        op = w.next_op()
        results = [
            await w.apply(a, op, mirror=(i == len(allocs) - 1)) for i, a in enumerate(allocs)
        ]
        assert all(r == results[0] for r in results), (op, results)


async def test_write_behind_round_trip(redis_url: str) -> None:
    m = Manager(track_changes=True)
    p = Persistence(m, redis_url)
    assert await p.restore()  # empty Redis: nothing to load
    p.start()
    a = LocalAllocator("ex1", m)
    b = LocalAllocator("ex2", m)
    await a.register(40, 4, "fp")
    await b.register(8, 4, "fp")
    wa, wb = Workload(1), Workload(2)
    for _ in range(6):
        await run_ops(wa, [a], 50)
        await run_ops(wb, [b], 20)
        await p.wait_flushed()
        assert await restored_snapshot(redis_url) == m.snapshot()
    assert m.executors["ex1"].pool.evictions > 0  # the workload exercised eviction
    # Hit-rate counters survive too.
    m2 = Manager(track_changes=True)
    p2 = Persistence(m2, redis_url)
    await p2.restore()
    assert m2.stats.totals() == m.stats.totals()
    await p2.redis.aclose()
    await p.stop()


async def test_flush_waits_for_a_quiet_moment_but_not_forever(redis_url: str) -> None:
    """A flush does not start right after an RPC (it would hold that RPC's reply on the event
    loop) but waits for QUIET_S without one; under calls that never pause it still goes out
    within MAX_DEFER_S of the last flush, so Redis keeps up with a busy kvmanager."""
    m = Manager(track_changes=True)
    p = Persistence(m, redis_url, interval=0.001)
    await p.restore()
    assert not p._should_wait()  # no call lately
    p.touch()
    assert p._should_wait()  # a call just answered: wait, the clock starts
    assert p._should_wait()
    p._last_call -= QUIET_S
    assert not p._should_wait()  # quiet long enough
    p.touch()
    assert p._waiting_since is not None
    p._waiting_since -= MAX_DEFER_S
    assert not p._should_wait()  # waited as long as allowed: flush anyway

    p.start()
    a = LocalAllocator("ex", m)
    await a.register(64, 4, "fp")
    busy = True

    async def calls() -> None:  # an RPC answered every 0.5 ms, never a quiet moment
        while busy:
            p.touch()
            await asyncio.sleep(0.0005)

    toucher = asyncio.create_task(calls())
    w = Workload(7)
    for _ in range(5):
        await run_ops(w, [a], 40)
        await p.wait_flushed(timeout=5.0)
        assert await restored_snapshot(redis_url) == m.snapshot()
    busy = False
    await toucher
    await p.stop()


async def test_incremental_writes_track_every_change(redis_url: str) -> None:
    """Flushed after every operation, so each copy-on-write, growth and commit goes out as an
    incremental write (SETRANGE) on a table Redis already holds."""
    m = Manager(track_changes=True)
    p = Persistence(m, redis_url)
    await p.restore()
    a = LocalAllocator("ex", m)
    await a.register(40, 4, "fp")
    await p.flush()
    w = Workload(5)
    for i in range(300):
        await run_ops(w, [a], 1)
        await p.flush()
        assert p.pending == 0
        if i % 15 == 0:
            assert await restored_snapshot(redis_url) == m.snapshot(), i
    assert await restored_snapshot(redis_url) == m.snapshot()
    assert p.counters.full_resyncs == 0  # all incremental (restore found Redis empty)
    await p.stop()


async def test_host_tier_map_round_trip_and_epoch_drop(redis_url: str) -> None:
    """The host tier's map (which hash each host block holds, its LRU order, the copies spilled
    ahead of eviction) and its counters are written behind with the rest, incrementally and in
    a full snapshot: a kvmanager restarting now restores it exactly. A new epoch of the executor
    drops both tiers' keys."""
    m = Manager(track_changes=True, spill_ahead_watermark=0.5)
    p = Persistence(m, redis_url)
    await p.restore()
    a = LocalAllocator("ex", m)
    await a.register(12, 4, "fp", num_host_blocks=10, kv_block_bytes=4096)
    await p.flush()
    w = Workload(11)
    copies = 0
    for i in range(300):
        await run_ops(w, [a], 1)
        if i % 3 == 0:
            m.spill_ahead("ex")  # (what a Step call does after its parts)
        await p.flush()
        if i % 20 == 0:
            snap = m.snapshot()
            copies += bool(snap["executors"]["ex"]["host_copies"])
            assert await restored_snapshot(redis_url) == snap, i
    assert copies > 0  # some of the restored snapshots had copies made ahead
    pool = m.executors["ex"].pool
    assert pool.num_spills > 0 and pool.num_restores > 0 and pool.host_drops > 0
    assert pool.num_host_cached > 0
    assert pool.num_spills_ahead > 0 and pool.num_evicted_ahead > 0
    assert await restored_snapshot(redis_url) == m.snapshot()
    p.full_resync = True  # the same state through a full rewrite
    await p.flush()
    assert await restored_snapshot(redis_url) == m.snapshot()
    r = aioredis.from_url(redis_url)
    epoch = m.executors["ex"].epoch
    old = f"pagemesh:kv:ex:ex:{epoch}:host"
    assert await r.hlen(old) > 0
    await a.register(12, 4, "fp", num_host_blocks=10)  # an executor restart: a new epoch
    await p.flush()
    assert not await r.exists(old) and not await r.exists(f"pagemesh:kv:ex:ex:{epoch}:index")
    snap = await restored_snapshot(redis_url)
    assert snap["executors"]["ex"]["host_index"] == {} and snap["executors"]["ex"]["index"] == {}
    await r.aclose()
    await p.stop()


async def test_keys_prefix_no_text_and_epoch_drop(redis_url: str) -> None:
    m = Manager(track_changes=True)
    p = Persistence(m, redis_url, prefix="pmtest:")
    await p.restore()
    p.start()
    a = LocalAllocator("ex", m)
    await a.register(16, 4, "fp")
    salt = "secret-tenant-salt"
    prompt = [1000 + i for i in range(9)]
    await a.allocate("s", prompt, salt)
    await a.commit([])
    from pagemesh.services.kvmanager.api import CommitEntry

    await a.commit([CommitEntry("s", 0, prompt[:4]), CommitEntry("s", 1, prompt[4:8])])
    await p.wait_flushed()
    r = aioredis.from_url(redis_url)
    keys = sorted(k.decode() for k in await r.keys("*"))
    assert keys and all(k.startswith("pmtest:") for k in keys), keys
    assert "pmtest:ex:ex:1:index" in keys
    assert {"pmtest:ex:ex:1:seqs", "pmtest:ex:ex:1:tables"} <= set(keys)
    blob = b""
    for k in keys:
        if await r.type(k) == b"hash":
            for f, v in (await r.hgetall(k)).items():
                blob += f + v
        else:
            blob += await r.get(k)
    assert len(await r.hget("pmtest:ex:ex:1:tables", "s|h0")) == 64  # two committed hashes
    table = await r.hget("pmtest:ex:ex:1:tables", "s|t0")
    assert table == b"".join(b.to_bytes(4, "little") for b in (0, 1, 2))  # block ids, u32 LE
    assert salt.encode() not in blob
    assert (1000).to_bytes(4, "little") + (1001).to_bytes(4, "little") not in blob  # no token ids
    # Re-registering drops every key of the old epoch.
    await a.register(16, 4, "fp")
    await p.wait_flushed()
    keys = sorted(k.decode() for k in await r.keys("*"))
    assert not [k for k in keys if ":ex:ex:1:" in k], keys
    snap = await restored_snapshot(redis_url, "pmtest:")
    assert snap["executors"]["ex"]["epoch"] == 2 and not snap["executors"]["ex"]["index"]
    assert snap["last_epoch"] == {"ex": 2}
    await r.aclose()
    await p.stop()


# -- kill -9 of a kvmanager process ---------------------------------------------------------------
def spawn(port: int, redis_url: str) -> subprocess.Popen:
    return subprocess.Popen(
        [
            sys.executable, "-P", "-m", "pagemesh.services.kvmanager.cli", "kvmanager",
            "--port", str(port), "--redis-url", redis_url,
            "--metrics-port", "0", "--log-level", "warning",
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )  # fmt: skip


async def wait_ready(proc: subprocess.Popen, port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        while time.monotonic() < deadline:
            assert proc.poll() is None, proc.stdout.read()  # type: ignore[union-attr]
            try:
                r = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=0.5)
                if r.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.aio.AioRpcError:
                pass
            await asyncio.sleep(0.05)
    raise TimeoutError("kvmanager did not become healthy")


async def wait_pending_zero(client: KVManagerClient, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        st = await client.get_stats(all_executors=True)
        if st.redis_connected and st.redis_pending_writes == 0:
            return
        assert time.monotonic() < deadline, f"pending writes: {st.redis_pending_writes}"
        await asyncio.sleep(0.005)


async def test_kill9_and_restart_restores_identical_state(redis_url: str) -> None:
    port = free_port()
    proc = spawn(port, redis_url)
    ref = LocalAllocator("ex", Manager())  # the in-process reference, fed the same operations
    w = Workload(7)
    try:
        await wait_ready(proc, port)
        client = KVManagerClient(f"127.0.0.1:{port}", "ex")
        assert await client.register(48, 4, "fp") == await ref.register(48, 4, "fp")
        for _ in range(3):
            await run_ops(w, [ref, client], 120)
            await wait_pending_zero(client)
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            # Redis holds exactly the reference's state...
            assert await restored_snapshot(redis_url) == ref.manager.snapshot()
            # ...and a restarted kvmanager answers exactly as the reference does.
            proc = spawn(port, redis_url)
            await wait_ready(proc, port)
            st = await client.get_stats()
            pool = ref.manager.executors["ex"].pool
            assert (st.executors[0].pool.free, st.executors[0].pool.cached) == (
                pool.num_free,
                pool.num_cached,
            )
            assert st.executors[0].epoch == ref.epoch
            for prefix in ([*range(100, 132), 1], [7] * 25):
                assert await client.match(prefix) == await ref.match(prefix)
        assert ref.manager.executors["ex"].pool.evictions > 0
        await client.close()
    finally:
        proc.kill()
        proc.wait()


# -- Redis stopped and restarted under traffic ----------------------------------------------------
@pytest.mark.parametrize("crash", [False, True], ids=["sigterm", "sigkill"])
async def test_redis_outage_under_traffic(redis_process: RedisProcess, crash: bool) -> None:
    server = await start_server(port=0, redis_url=redis_process.url, restore_timeout=5)
    client = KVManagerClient(f"127.0.0.1:{server.port}", "ex")
    health = health_pb2_grpc.HealthStub(client.channel)

    async def redis_health() -> int:
        r = await health.Check(health_pb2.HealthCheckRequest(service=REDIS_HEALTH), timeout=2)
        return r.status

    await client.register(64, 4, "fp")
    w = Workload(11)
    stop = asyncio.Event()
    done = 0

    async def traffic() -> None:
        nonlocal done
        while not stop.is_set():
            await run_ops(w, [client], 1)
            done += 1
            await asyncio.sleep(0)

    task = asyncio.create_task(traffic())
    try:
        await asyncio.sleep(0.3)
        assert await redis_health() == health_pb2.HealthCheckResponse.SERVING
        redis_process.stop(kill=crash)
        before = done
        deadline = time.monotonic() + 10
        while (await client.get_stats()).redis_connected:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.5)
        assert done > before + 20  # allocation kept working while Redis was gone
        assert await redis_health() == health_pb2.HealthCheckResponse.NOT_SERVING
        st = await client.get_stats()
        assert not st.redis_connected and st.redis_pending_writes > 0
        assert server.persistence.counters.errors > 0
        redis_process.start()
        deadline = time.monotonic() + 10
        while not (await client.get_stats()).redis_connected:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.3)  # more traffic on the resynced Redis
    finally:
        stop.set()
        await task
    await wait_pending_zero(client)
    assert await redis_health() == health_pb2.HealthCheckResponse.SERVING
    snap = server.manager.snapshot()
    assert snap["executors"]["ex"]["index"], "the workload published hashes"
    assert await restored_snapshot(redis_process.url) == snap  # no index entry (or anything) lost
    await client.close()
    await server.stop()


async def test_redis_down_at_start_then_restored(redis_process: RedisProcess) -> None:
    """State written earlier comes back even when Redis only answers after kvmanager started."""
    m = Manager(track_changes=True)
    p = Persistence(m, redis_process.url)
    await p.restore()
    a = LocalAllocator("ex", m)
    await a.register(16, 4, "fp")
    await run_ops(Workload(3), [a], 40)
    await p.flush()
    expect = m.snapshot()
    await p.redis.aclose()
    redis_process.stop()
    server = await start_server(port=0, redis_url=redis_process.url, restore_timeout=0.2)
    assert not server.manager.executors and not server.persistence.connected
    redis_process.start()
    deadline = time.monotonic() + 10
    while not server.persistence.connected:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.02)
    assert server.manager.snapshot() == expect
    await server.stop()


async def test_idle_redis_coming_back_empty_is_rewritten(redis_process: RedisProcess) -> None:
    """Redis crashes while kvmanager is idle and comes back with no data at all: the idle ping
    notices, the new run_id forces a full rewrite, and Redis holds the whole state again."""
    server = await start_server(port=0, redis_url=redis_process.url)
    client = KVManagerClient(f"127.0.0.1:{server.port}", "ex")
    await client.register(48, 4, "fp")
    await run_ops(Workload(13), [client], 80)
    await wait_pending_zero(client)
    expect = server.manager.snapshot()
    assert expect["executors"]["ex"]["index"]
    redis_process.stop(kill=True)
    for f in sorted(redis_process.data_dir.rglob("*"), reverse=True):  # type: ignore[union-attr]
        f.unlink() if f.is_file() else f.rmdir()
    redis_process.start()
    deadline = time.monotonic() + 15
    while True:
        try:
            if await restored_snapshot(redis_process.url) == expect:
                break
        except Exception:
            pass
        assert time.monotonic() < deadline, "Redis was not rewritten"
        await asyncio.sleep(0.2)
    assert server.persistence.counters.full_resyncs >= 1
    assert server.manager.snapshot() == expect
    await client.close()
    await server.stop()


async def test_reused_sequence_id_leaves_no_stale_chunks(redis_url: str) -> None:
    from pagemesh.services.kvmanager.api import CommitEntry

    m = Manager(track_changes=True)
    p = Persistence(m, redis_url)
    await p.restore()
    a = LocalAllocator("ex", m)
    await a.register(128, 4, "fp")
    toks = list(range(300))  # 75 blocks: two table chunks
    await a.allocate("r", toks)
    await a.commit([CommitEntry("r", i, toks[4 * i : 4 * i + 4]) for i in range(40)])  # 5 chunks
    await p.flush()
    await a.release(["r"])
    await a.allocate("r", [1, 2, 3, 4, 5])  # same id, shorter, before the next flush
    await p.flush()
    r = aioredis.from_url(redis_url)
    assert sorted(await r.hkeys("pagemesh:kv:ex:ex:1:tables")) == [b"r|t0"]
    assert await restored_snapshot(redis_url) == m.snapshot()
    await a.release(["r"])
    await p.flush()
    assert await r.hlen("pagemesh:kv:ex:ex:1:tables") == 0
    assert await r.hlen("pagemesh:kv:ex:ex:1:seqs") == 0
    await r.aclose()
    await p.stop()
