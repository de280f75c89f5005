"""Reconcile, what an executor sends once kvmanager is back from an outage (a restart from Redis
may have lost the calls it answered last): kvmanager releases what the executor no longer holds
and names what it does not hold as the executor does; afterwards both agree."""

from __future__ import annotations

import asyncio

import pytest
from pagemesh.services.kvmanager.api import StaleEpoch

from tests.kvmanager.conftest import BS


async def test_reconcile_releases_the_unlisted_and_names_the_lost(make) -> None:
    a = await make(num_blocks=16)
    kept = await a.allocate("kept", list(range(2 * BS)))
    await a.allocate("gone", list(range(100, 100 + BS)))  # its release was lost
    other = await a.allocate("other", list(range(200, 200 + BS)))
    ex = a.manager.executors["ex"]
    in_use = ex.pool.num_in_use

    released, lost = await a.reconcile(
        {
            "kept": kept.block_ids,
            "other": [*other.block_ids, 15],  # an Extend it lost: another table
            "unknown": [7],  # an allocation it lost
        }
    )
    assert released == 2  # "gone", and its own version of "other"
    assert sorted(lost) == ["other", "unknown"]
    assert set(ex.seqs) == {"kept"}
    assert ex.seqs["kept"].blocks == kept.block_ids
    assert ex.pool.num_in_use == in_use - 2
    a.manager.check()

    # Agreeing tables: nothing to do.
    assert await a.reconcile({"kept": kept.block_ids}) == (0, [])
    # No sequence held: everything goes.
    assert await a.reconcile({}) == (1, [])
    assert ex.pool.num_in_use == 0


async def test_reconcile_with_a_stale_epoch_says_so(make) -> None:
    a = await make()
    a.epoch += 1
    with pytest.raises(StaleEpoch):
        await a.reconcile({})


async def test_a_broken_session_counts_as_a_connection_loss() -> None:
    """A kvmanager that goes away between two calls fails none of them; the client counts the
    broken Session stream, so the executor reconciles all the same. Its own close is no loss."""
    from pagemesh.services.kvmanager.client import KVManagerClient
    from pagemesh.services.kvmanager.server import start_server

    server = await start_server(port=0)
    c = KVManagerClient(f"127.0.0.1:{server.port}", "ex", timeout=2.0)
    await c.register(16, BS, "fp")
    await c.allocate("s", [1, 2])
    assert c.connection_losses == 0
    await server.stop(0)
    for _ in range(100):
        if c.connection_losses:
            break
        await asyncio.sleep(0.05)
    assert c.connection_losses == 1

    server = await start_server(port=0)
    c2 = KVManagerClient(f"127.0.0.1:{server.port}", "ex", timeout=2.0)
    await c2.register(16, BS, "fp")
    await c2.allocate("s", [1, 2])
    await c2.close()
    await asyncio.sleep(0.1)
    assert c2.connection_losses == 0
    await c.close()
    await server.stop(0)
