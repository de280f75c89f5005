"""A gateway SIGKILLed while its streams generate: its Serve stream to the executor breaks, and
the executor aborts every request of that stream within a step or so (its blocks released), so
no executor keeps generating for clients nobody can reach any more. The gateway's restart then
serves again."""

from __future__ import annotations

import asyncio

import pytest

from tests.reliability.client import session
from tests.reliability.workload import streaming_chat_maker, wait_request_ok
from tests.support.mesh import Mesh, assert_pool_consistent, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

STREAMS = 8
# Long enough that a request still generating after the gateway's death could not have finished
# by itself within the waits below (2,000 tokens each, 8 at once, on a CPU).
MAX_TOKENS = 2000


async def test_gateway_death_aborts_its_requests_on_the_executor(mesh: Mesh) -> None:
    baseline_in_use = mesh.pool().in_use
    async with session() as http:
        make = streaming_chat_maker(mesh, http, max_tokens=MAX_TOKENS, seed=9, ignore_eos=True)
        streams = [asyncio.create_task(make(i)) for i in range(STREAMS)]
        try:
            await asyncio.to_thread(
                wait_for,
                lambda: mesh.executor_info(timeout=2).num_running >= STREAMS,
                60,
                f"{STREAMS} sequences running",
            )
            mesh.kill("gateway")
            in_use_at_kill = mesh.pool().in_use
            # Every request of the dead gateway's stream is aborted: the executor runs nothing.
            peak = in_use_at_kill

            def drained() -> bool:
                nonlocal peak
                info = mesh.executor_info(timeout=2)
                peak = max(peak, mesh.pool(timeout=2).in_use)
                return info.num_running == 0 and info.num_waiting == 0

            await asyncio.to_thread(wait_for, drained, 30, "the executor to abort the requests")
        finally:
            await asyncio.gather(*streams, return_exceptions=True)  # (all cut by the kill)
    # At most the block each sequence had reserved ahead: none kept generating.
    assert peak <= in_use_at_kill + STREAMS, (
        f"blocks in use grew from {in_use_at_kill} to {peak} after the gateway died"
    )
    pool = mesh.wait_idle(timeout=30, baseline_in_use=baseline_in_use)
    assert_pool_consistent(pool)
    assert pool.in_use == baseline_in_use

    await asyncio.to_thread(mesh.start_service, "gateway")
    await asyncio.to_thread(mesh.wait_for_serve_streams)
    await asyncio.to_thread(wait_request_ok, mesh)
