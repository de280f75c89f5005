"""An executor whose epoch is bumped under it (another registration with its id, as a second
`pagemesh up` on the same kvmanager made it): it re-registers by itself, its requests in flight
end cleanly (retryable: a gateway may send them again), and it serves the next request, with the
prefix index working under its new epoch and no block leaked. Before this, every step failed for
ever with "epoch N ... is stale"."""

from __future__ import annotations

import asyncio

import pytest
from pagemesh.proto import kvmanager_pb2

from tests.reliability.client import CLEAN_ERROR, COMPLETED, chat_body, session
from tests.reliability.workload import (
    SYSTEM,
    async_wait_for,
    cached_tokens_of,
    streaming_chat_maker,
    wait_request_ok,
)
from tests.support.mesh import Mesh, assert_pool_consistent

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def _impostor_registers(mesh: Mesh) -> int:
    """Another process registers the executor's id (its pool as kvmanager knows it)."""
    pool = mesh.pool()
    reply = mesh.kv_stub().RegisterExecutor(
        kvmanager_pb2.RegisterExecutorRequest(
            executor_id=mesh.executor_id,
            num_blocks=pool.num_blocks,
            block_size=pool.block_size,
            model_fingerprint="an-impostor",
        ),
        timeout=5,
    )
    return int(reply.epoch)


async def test_executor_re_registers_after_its_epoch_is_bumped(mesh: Mesh, figures) -> None:
    async with session() as http:
        make = streaming_chat_maker(mesh, http, max_tokens=200, seed=5, ignore_eos=True)
        streams = [asyncio.create_task(make(i)) for i in range(4)]
        await asyncio.sleep(3)
        bumped = await asyncio.to_thread(_impostor_registers, mesh)
        results = await asyncio.wait_for(asyncio.gather(*streams), 120)
        for r in results:  # completed (a gateway that migrates) or a clean, retryable end
            assert r.outcome in (COMPLETED, CLEAN_ERROR) and r.done, f"stream not ended: {r}"

        # The next request is served: the executor registered again, past the impostor.
        await asyncio.to_thread(wait_request_ok, mesh, 30)
        epoch = mesh.executor_stats().epoch
        assert epoch > bumped, f"still on epoch {epoch} (the impostor's is {bumped})"
        assert mesh.executor_info().epoch == epoch, "GetInfo still reports the old epoch"

        # The new epoch's prefix index works: a repeated prompt hits.
        probe = chat_body("Which station comes last?", 4, system=SYSTEM)
        await cached_tokens_of(mesh, http, probe)
        await async_wait_for(
            lambda: cached_tokens_of(mesh, http, probe), 30, "a prefix hit on the new epoch", 1.0
        )
    figures.record(
        "executor epoch bumped under load",
        requests=len(results),
        completed=sum(r.outcome == COMPLETED for r in results),
        failed_cleanly=sum(r.outcome == CLEAN_ERROR for r in results),
    )
    pool = mesh.wait_idle(timeout=30)
    assert_pool_consistent(pool)
    assert pool.in_use == 0
