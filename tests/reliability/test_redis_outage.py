"""Redis stopped for 30 s under load, then started again: once with its data (AOF persistence),
once empty (a replacement server).

Must show: serving goes on (every request of the load completes, none even fails cleanly);
health says degraded meanwhile (kvmanager's GetStats.redis_connected, the gateway's /health);
kvmanager brings Redis back up to date; no index entry is lost. The last point is checked twice:
the Redis key set after recovery contains every key of before the outage, and after a kvmanager
SIGKILL + restart (state from Redis alone) the prompts served during the outage still hit.
"""

from __future__ import annotations

import asyncio
import os
import time

import pytest
from pagemesh.proto import health_names

from tests.reliability.client import (
    CLEAN_ERROR,
    COMPLETED,
    LOST,
    chat_body,
    run_load,
    session,
)
from tests.reliability.workload import (
    STREAM_TIMEOUT,
    SYSTEM,
    async_wait_for,
    cached_tokens_of,
    streaming_chat_maker,
    wait_redis_synced,
)
from tests.support.mesh import Mesh, assert_pool_consistent, grpc_health_status

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

REDIS_HEALTH = health_names.KVMANAGER_REDIS
OUTAGE_S = float(os.environ.get("PAGEMESH_REDIS_OUTAGE_S", "30"))

BEFORE = "Before the outage: how long from Aldgate to Epsom on a Sunday morning service?"
DURING = "During the outage: how many platforms does Guildford station have in total today?"


def _redis_entries(mesh: Mesh) -> set[tuple[bytes, bytes]]:
    """Every key kvmanager keeps in Redis, and every prefix-index entry (key, block hash): the
    index is a hash per executor epoch ("...:index", block hash -> block id), so an entry lost
    inside it would not show in the key set alone."""
    client = mesh.redis_client()
    try:
        entries: set[tuple[bytes, bytes]] = set()
        for key in client.scan_iter(count=1000):
            entries.add((key, b""))
            if key.endswith(b":index"):
                entries.update((key, field) for field in client.hkeys(key))
        return entries
    finally:
        client.close()


@pytest.mark.parametrize("restart", ["persistent", "empty"])
async def test_redis_outage_under_load(mesh: Mesh, figures, restart: str) -> None:
    async with session() as http:
        # Cache a prompt and wait for it to reach Redis.
        probe_before = chat_body(BEFORE, 4, system=SYSTEM)
        await cached_tokens_of(mesh, http, probe_before)
        mesh.wait_idle(30)
        await asyncio.to_thread(wait_redis_synced, mesh)
        keys_before = await asyncio.to_thread(_redis_entries, mesh)
        assert keys_before, "kvmanager wrote nothing to Redis"
        evictions_before = mesh.executor_stats().pool.evictions

        stop = asyncio.Event()
        make = streaming_chat_maker(mesh, http, max_tokens=8, seed=3)
        load = asyncio.create_task(
            run_load(make, concurrency=6, total=2000, duration=OUTAGE_S + 60, stop=stop)
        )
        await asyncio.sleep(2)

        mesh.stop_redis()
        stopped_at = time.monotonic()
        kv_degraded = health_degraded = gw_degraded = False
        overall_serving = True
        during_cached = 0
        while time.monotonic() - stopped_at < OUTAGE_S:
            stats = await asyncio.to_thread(mesh.stats)
            kv_degraded |= not stats.redis_connected
            health_degraded |= await asyncio.to_thread(_redis_health, mesh) == "NOT_SERVING"
            overall_serving &= await asyncio.to_thread(_redis_health, mesh, "") == "SERVING"
            gw_status, health = await asyncio.to_thread(mesh.gateway_health)
            assert gw_status == 200, health  # it serves all along
            gw_degraded |= health.get("status") == "degraded" and health["redis"] == "unreachable"
            if not during_cached:
                # A new prompt served while Redis is away: its blocks must reach Redis later.
                await cached_tokens_of(mesh, http, chat_body(DURING, 4, system=SYSTEM))
                during_cached = 1
            await asyncio.sleep(1.0)

        await asyncio.to_thread(mesh.start_redis, restart == "empty")
        started_at = time.monotonic()
        await asyncio.to_thread(wait_redis_synced, mesh, 60.0)
        synced_s = time.monotonic() - started_at
        stop.set()
        report = await asyncio.wait_for(load, STREAM_TIMEOUT + 30)
        counts = report.counts()

        figures.record(
            f"Redis stopped {OUTAGE_S:.0f}s under load, restarted {restart}",
            **report.figures(),
            stats_said_disconnected=kv_degraded,
            grpc_health_said_degraded=health_degraded,
            gateway_health_said_degraded=gw_degraded,
            redis_resync_s=round(synced_s, 2),
        )
        # Serving went on: not even a clean failure is acceptable for a Redis outage.
        assert counts[COMPLETED] == len(report.results), (
            f"{report.summary()}; errors: {report.examples(CLEAN_ERROR)} {report.examples(LOST)}"
        )
        assert len(report.results) > 0
        assert kv_degraded, "GetStats.redis_connected stayed true while Redis was down"
        # kvmanager's gRPC health reports Redis as its own service ("<KVManager>.redis"), while
        # the service as a whole stays SERVING: degraded, not down. The gateway's /health
        # stays 200 (it serves) and says degraded, naming Redis.
        assert health_degraded, "kvmanager's Redis health never said NOT_SERVING"
        assert overall_serving, "kvmanager's overall health left SERVING during a Redis outage"
        assert gw_degraded, "the gateway's /health never said degraded during the outage"
        assert _redis_health(mesh) == "SERVING"
        health_status, health = mesh.gateway_health()
        assert health_status == 200
        assert health["status"] == "ok" and health["redis"] == "connected", health

        pool = mesh.wait_idle(30)
        assert_pool_consistent(pool)
        await asyncio.to_thread(wait_redis_synced, mesh)
        keys_after = await asyncio.to_thread(_redis_entries, mesh)
        # An eviction legitimately drops one index entry; nothing else may go missing.
        evicted = mesh.executor_stats().pool.evictions - evictions_before
        missing = keys_before - keys_after
        assert len(missing) <= evicted, (
            f"{len(missing)} of {len(keys_before)} Redis entries lost ({evicted} evictions): "
            f"{sorted(missing)[:5]}"
        )
        assert any(k.endswith(b":index") and f for k, f in keys_after)

        # kvmanager restarted from Redis alone still knows both prompts.
        mesh.kill("kvmanager")
        await asyncio.to_thread(mesh.start_service, "kvmanager")
        for body in (probe_before, chat_body(DURING, 4, system=SYSTEM)):
            what = f"a prefix hit for {body['messages'][-1]['content']!r} after the restart"
            await async_wait_for(lambda b=body: cached_tokens_of(mesh, http, b), 60, what, 1.0)


def _redis_health(mesh: Mesh, service: str = REDIS_HEALTH) -> str:
    return grpc_health_status(mesh.kv_address, 2.0, service)
