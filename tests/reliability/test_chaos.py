"""Chaos: for CHAOS_S seconds (3 minutes; PAGEMESH_CHAOS_S to change it) 16 clients stream
while every 15-30 s a random service of the mesh is killed with SIGKILL (kvmanager, the executor
or Redis) and brought back as a supervisor would (`pagemesh up`, compose's restart policy).

Must show (issue 20): every request completed (ride-through, request migration); no block
leaked once the load is over, the pool's accounting exact; the gateway (never killed here) keeps
its memory and open file descriptors flat; the prefix index still hits. The figures (requests,
migrations, failures, time to recover per fault) go to the reliability table of RESULTS.md.

Not here: killing a gateway worker (its in-flight connections are lost by definition; the
executor aborting their requests is tests/reliability's gateway-death test).
"""

from __future__ import annotations

import asyncio
import os
import random
import re
import time
import urllib.request

import psutil
import pytest

from tests.reliability.client import COMPLETED, LOST, chat_body, run_load, session
from tests.reliability.workload import (
    STREAM_TIMEOUT,
    SYSTEM,
    cached_tokens_of,
    streaming_chat_maker,
    wait_request_ok,
)
from tests.support.mesh import Mesh, assert_pool_consistent

CHAOS_S = float(os.environ.get("PAGEMESH_CHAOS_S", "180"))
CLIENTS = 16
VICTIMS = ("kvmanager", "executor", "redis")

pytestmark = [pytest.mark.slow, pytest.mark.timeout(int(CHAOS_S) + 420)]


def _kill_and_restore(mesh: Mesh, victim: str) -> None:
    """SIGKILL, a moment down, then back on the same port (Redis from its own files)."""
    if victim == "redis":
        mesh.stop_redis(kill=True)
        time.sleep(1.0)
        mesh.start_redis()
        return
    mesh.kill(victim)
    time.sleep(1.0)
    mesh.start_service(victim)


def _migrations(mesh: Mesh) -> int:
    req = urllib.request.Request(mesh.url + "/metrics", headers=mesh.headers)
    with urllib.request.urlopen(req, timeout=10) as resp:
        text = resp.read().decode()
    return int(
        sum(
            float(v)
            for v in re.findall(r"^pagemesh_gateway_migrations_total\{[^}]*\} (\S+)$", text, re.M)
        )
    )


async def test_chaos_random_sigkills_under_streaming_load(mesh: Mesh, figures) -> None:
    rng = random.Random(20)
    gateway = psutil.Process(mesh.pids()["gateway"])
    async with session() as http:
        probe = chat_body("Which station comes first?", 4, system=SYSTEM)
        await cached_tokens_of(mesh, http, probe)
        mesh.wait_idle(30)
        baseline_in_use = mesh.executor_stats().pool.in_use
        migrations_before = _migrations(mesh)

        stop = asyncio.Event()
        make = streaming_chat_maker(mesh, http, max_tokens=24, seed=3, ignore_eos=True)
        load = asyncio.create_task(
            run_load(make, concurrency=CLIENTS, duration=CHAOS_S + 120, stop=stop)
        )
        await asyncio.sleep(10)  # warm: the gateway's steady memory and descriptors
        rss_start, fds_start = gateway.memory_info().rss, gateway.num_fds()

        faults: list[dict[str, object]] = []
        # Each service once in every three faults, in a random order: all of them get killed.
        order = [v for _ in range(int(CHAOS_S // 15) + 1) for v in rng.sample(VICTIMS, 3)]
        start = time.monotonic()
        while True:
            pause = rng.uniform(15, 30)
            if time.monotonic() - start + pause > CHAOS_S:
                break
            await asyncio.sleep(pause)
            victim = order[len(faults)]
            killed_at = time.monotonic()
            await asyncio.to_thread(_kill_and_restore, mesh, victim)
            back_at = await asyncio.to_thread(wait_request_ok, mesh)
            faults.append({"victim": victim, "recover_s": round(back_at - killed_at, 2)})
        await asyncio.sleep(5)  # load after the last fault too
        stop.set()
        report = await asyncio.wait_for(load, STREAM_TIMEOUT + 60)
        rss_end, fds_end = gateway.memory_info().rss, gateway.num_fds()

        migrations = _migrations(mesh) - migrations_before
        counts = report.counts()
        figures.record(
            f"chaos: {CHAOS_S:.0f} s, a SIGKILL every 15-30 s",
            **report.figures(),
            faults=len(faults),
            faults_by_service={v: sum(f["victim"] == v for f in faults) for v in VICTIMS},
            recover_s=[f["recover_s"] for f in faults],
            migrations=migrations,
            gateway_rss_mb=[round(rss_start / 2**20, 1), round(rss_end / 2**20, 1)],
            gateway_fds=[fds_start, fds_end],
        )
        assert len(faults) >= 3, "the run was too short to kill every service"
        assert not report.lost(), f"{report.summary()}; lost: {report.examples(LOST)}"
        failed = [r for r in report.results if r.outcome != COMPLETED]
        assert not failed, f"{report.summary()}; failed: {report.examples(failed[0].outcome)}"
        assert counts[COMPLETED] >= CLIENTS * len(faults), report.summary()
        assert all(r.finish_reason == "length" for r in report.results), "a stream was cut short"

        # No block leaked, the accounting exact, and the index still hits.
        pool = mesh.wait_idle(timeout=60, baseline_in_use=baseline_in_use)
        assert_pool_consistent(pool)
        assert pool.in_use == baseline_in_use
        assert await cached_tokens_of(mesh, http, probe) > 0, "the prefix index no longer hits"

        # The gateway, which lived through every fault, is flat.
        assert rss_end <= rss_start * 1.3 + (64 << 20), (rss_start, rss_end)
        assert fds_end <= fds_start + 16, (fds_start, fds_end)
