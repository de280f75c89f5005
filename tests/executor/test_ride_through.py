"""The scheduler through a kvmanager outage, over the in-process allocator made unreachable at
will: running sequences go on with the blocks they hold, a sequence short of a block waits,
nothing is admitted; kvmanager "restarts" from an older copy of its state (what Redis held: the
calls it answered last are lost), and the reconcile that ends the outage leaves both sides
agreeing, with no block leaked."""

from __future__ import annotations

import copy

from pagemesh.services.executor.scheduler import Scheduler
from pagemesh.services.executor.sequence import SeqStatus
from pagemesh.services.kvmanager.api import AllocatorUnavailable
from pagemesh.services.kvmanager.local import LocalAllocator

from tests.executor.test_scheduler import BS, _scheduler, _seq, _step


def _cut(alloc: LocalAllocator, down: list[bool]) -> None:
    """Every call of `alloc` raises AllocatorUnavailable while down[0]."""
    for name in ("allocate", "extend", "commit", "fork", "release", "step", "reconcile"):
        inner = getattr(alloc, name)

        async def call(*a, _inner=inner, **kw):
            if down[0]:
                raise AllocatorUnavailable("kvmanager unreachable (test)")
            return await _inner(*a, **kw)

        setattr(alloc, name, call)


def _pool(alloc: LocalAllocator):
    return alloc.manager.executors[alloc.executor_id].pool


async def _finish(sc: Scheduler, steps: int = 400) -> None:
    for _ in range(steps):
        if not sc.has_unfinished():
            break
        out = await _step(sc)
        ended = [q for q in out.seqs if q.num_computed_tokens >= q.num_prompt_tokens + 20]
        for q in ended:
            if q.status == SeqStatus.RUNNING:
                sc.finish(q, q.finish_reason)
                sc.link.defer([], [q.seq_id])
    await sc.drain()


async def test_outage_rides_through_and_reconciles_a_restart_that_lost_calls() -> None:
    sc, alloc = await _scheduler(num_blocks=64, num_lookahead_tokens=4)
    down = [False]
    _cut(alloc, down)
    short, long_ = _seq("short", list(range(30))), _seq("long", list(range(100, 140)))
    sc.add(short)
    sc.add(long_)
    for _ in range(3):
        await _step(sc)
    redis_copy = copy.deepcopy(alloc.manager)  # what Redis holds: the last calls will be lost
    # After the copy: `short` ends (its release reaches kvmanager), `long` extends.
    sc.finish(short, short.finish_reason)
    sc.link.defer([], [short.seq_id])
    for _ in range(BS):
        await _step(sc)
    await sc.drain()
    assert short.seq_id not in alloc.manager.executors[alloc.executor_id].seqs

    # kvmanager dies; it comes back with the older state.
    down[0] = True
    alloc.manager = redis_copy
    late = _seq("late", list(range(200, 220)))
    sc.add(late)
    ran = 0
    for _ in range(3 * BS):
        out = await _step(sc)
        ran += long_ in out.seqs
        assert late.status == SeqStatus.WAITING, "admitted while kvmanager was unreachable"
    assert sc.link.riding
    assert 0 < ran < 3 * BS, "long must run on the blocks it holds, then wait for one"
    assert long_.status == SeqStatus.RUNNING, "a sequence short of a block waits, not failed"

    down[0] = False
    for _ in range(50):
        await _step(sc)
        if not sc.link.riding and late.status == SeqStatus.RUNNING:
            break
    assert not sc.link.riding
    assert late.status == SeqStatus.RUNNING
    held = alloc.manager.executors[alloc.executor_id].seqs
    # Both sides agree on every table: the lost release happened, the lost Extend recomputed.
    assert short.seq_id not in held
    for q in sc.running:
        assert held[q.seq_id].blocks == q.block_table, q.seq_id
    sc.check()

    await _finish(sc)
    pool = _pool(alloc)
    assert not alloc.manager.executors[alloc.executor_id].seqs
    assert pool.num_in_use == 0, "blocks leaked across the outage"
    alloc.manager.check()
