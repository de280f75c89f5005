"""Reconcile, what an executor sends once kvmanager is back from an outage (a restart from Redis
may have lost the calls it answered last): kvmanager releases what the executor no longer holds
and names what it does not hold as the executor does; afterwards both agree."""

from __future__ import annotations

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
