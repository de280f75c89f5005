"""A disconnect storm: hundreds of streaming clients that drop their connection mid-flight (before
the first token, after one, after a few), all at once. Blocks must come back to the baseline.
"""

from __future__ import annotations

import asyncio
import os
import random
import time

import pytest

from tests.reliability.client import COMPLETED, chat_body, session, stream_request
from tests.reliability.workload import SYSTEM, chat_url
from tests.support.mesh import Mesh, assert_pool_consistent

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

CLIENTS = int(os.environ.get("PAGEMESH_STORM_CLIENTS", "200"))


async def test_disconnect_storm_releases_every_block(mesh: Mesh, figures) -> None:
    baseline = mesh.wait_idle(30)
    rng = random.Random(4)

    async def client(i: int) -> str:
        body = chat_body(f"Storm {i}: tell me a long story about trains.", 64, system=SYSTEM)
        body["ignore_eos"] = True
        kind = i % 4
        if kind == 0:
            # Gone before any token: still queued or in prefill when the socket closes.
            result = await stream_request(
                http, chat_url(mesh), body, headers=mesh.headers, timeout=rng.uniform(0.05, 1.5)
            )
        else:
            result = await stream_request(
                http,
                chat_url(mesh),
                body,
                headers=mesh.headers,
                timeout=60,
                stop_after_chunks=(1, 2, 6)[kind - 1],
            )
        return result.detail

    async with session(limit=CLIENTS + 8) as http:
        t0 = time.monotonic()
        await asyncio.gather(*(client(i) for i in range(CLIENTS)))
        storm_s = time.monotonic() - t0

        dropped_at = time.monotonic()
        pool = await asyncio.to_thread(mesh.wait_idle, 60.0, baseline.in_use)
        drain_s = time.monotonic() - dropped_at
        assert_pool_consistent(pool)
        info = mesh.executor_info()
        assert info.num_running == 0 and info.num_waiting == 0, (
            f"executor still holds {info.num_running} running / {info.num_waiting} waiting"
        )

        # The mesh still serves normally afterwards.
        after = await stream_request(
            http, chat_url(mesh), chat_body("Still there?", 4, system=SYSTEM), headers=mesh.headers
        )
        assert after.outcome == COMPLETED, after

    figures.record(
        "disconnect storm",
        clients=CLIENTS,
        storm_s=round(storm_s, 2),
        drain_s=round(drain_s, 2),
        in_use_baseline=baseline.in_use,
        in_use_after=pool.in_use,
    )
