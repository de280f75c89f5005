"""kvmanager SIGKILLed under streaming load, then restarted on the same port.

Must show: every stream completes or ends with a clean error (none hangs past the bound);
kvmanager restores its state from Redis (same executor epoch, prefix index intact); afterwards no
block is leaked (free + in use + cached = total, in use back to the baseline) and the prefix index
still hits.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from tests.reliability.client import COMPLETED, LOST, chat_body, run_load, session
from tests.reliability.workload import (
    STREAM_TIMEOUT,
    SYSTEM,
    cached_tokens_of,
    streaming_chat_maker,
    wait_redis_synced,
    wait_request_ok,
)
from tests.support.mesh import Mesh, assert_pool_consistent

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

DOWN_S = 3.0


async def test_kvmanager_sigkill_under_streaming_load(mesh: Mesh, figures) -> None:
    async with session() as http:
        # The shared system prompt is cached and hits before the fault.
        probe = chat_body("Which station comes first?", 4, system=SYSTEM)
        await cached_tokens_of(mesh, http, probe)
        cached_before = await cached_tokens_of(mesh, http, probe)
        assert cached_before > 0, "the prefix index does not hit even before the fault"
        mesh.wait_idle(30)
        await asyncio.to_thread(wait_redis_synced, mesh)
        before = mesh.executor_stats()
        baseline_in_use = before.pool.in_use

        stop = asyncio.Event()
        # Short streams, so that sequences start, extend and finish (release) while kvmanager
        # is down: each of those calls fails and must be made good once it is back.
        make = streaming_chat_maker(mesh, http, max_tokens=8, seed=1, ignore_eos=True)
        load = asyncio.create_task(run_load(make, concurrency=8, total=400, duration=60, stop=stop))
        await asyncio.sleep(4)  # streams in every phase: queued, prefilling, decoding

        mesh.kill("kvmanager")
        killed_at = time.monotonic()
        await asyncio.sleep(DOWN_S)  # a real outage, not just a blip
        ready_s = await asyncio.to_thread(mesh.start_service, "kvmanager")
        after_restart = mesh.executor_stats()

        # Serving is back when a fresh request completes end to end.
        recovered_at = await asyncio.to_thread(wait_request_ok, mesh)
        await asyncio.sleep(3)  # some load after recovery too
        stop.set()
        report = await asyncio.wait_for(load, STREAM_TIMEOUT + 30)

        counts = report.counts()
        figures.record(
            "kvmanager SIGKILL under load",
            **report.figures(),
            kvmanager_ready_s=round(ready_s, 2),
            recover_s=round(recovered_at - killed_at, 2),
        )
        assert not report.lost(), f"{report.summary()}; lost: {report.examples(LOST)}"
        assert counts[COMPLETED] > 0, report.summary()

        # State restored from Redis, not rebuilt: same executor, same epoch, same pool size.
        assert after_restart.epoch == before.epoch, (
            f"epoch {before.epoch} -> {after_restart.epoch}: state was not restored from Redis"
        )
        assert after_restart.pool.num_blocks == before.pool.num_blocks

        # No block leaked: every sequence released, accounting exact.
        pool = mesh.wait_idle(timeout=30, baseline_in_use=baseline_in_use)
        assert_pool_consistent(pool)
        assert pool.in_use == baseline_in_use

        # The prefix index survived the crash.
        cached_after = await cached_tokens_of(mesh, http, probe)
        assert cached_after >= cached_before, (
            f"prefix index lost by the crash: {cached_before} cached tokens before, "
            f"{cached_after} after"
        )
