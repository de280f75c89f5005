"""The core's change events (events.py) name everything the write-behind must rewrite: after any
operation, every block whose record changed, every index entry that changed and every sequence
whose table or chain changed, with the lowest table index a copy-on-write replaced. What
persistence writes incrementally is only correct if they do (it reads current values of what
the events name and nothing else)."""

from __future__ import annotations

from pagemesh.services.kvmanager import events
from pagemesh.services.kvmanager.changes import NOT_REPLACED, ExecutorChanges
from pagemesh.services.kvmanager.local import LocalAllocator
from pagemesh.services.kvmanager.manager import ExecutorState, Manager

from tests.kvmanager.workload import Workload

NUM_BLOCKS = 40


def _state(ex: ExecutorState) -> tuple[list, dict, dict]:
    p = ex.pool
    records = [(p.ref[b], p.stamp[b], p.hash[b]) for b in range(ex.num_blocks)]
    seqs = {sid: (list(s.blocks), list(s.hashes)) for sid, s in ex.seqs.items()}
    return records, dict(p.index), seqs


def _first_difference(a: list, b: list) -> int:
    return next(
        (i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b))
    )


async def test_events_name_every_change() -> None:
    m = Manager(track_changes=True)
    a = LocalAllocator("ex", m)
    await a.register(NUM_BLOCKS, 4, "fp")
    ex = m.executors["ex"]
    seen = set()
    for seed in range(3):
        w = Workload(seed)
        for _ in range(400):
            records0, index0, seqs0 = _state(ex)
            await w.apply(a, w.next_op())
            records1, index1, seqs1 = _state(ex)
            assert ex.events is not None
            recorded = events.take(ex.events)
            seen.update(kind for kind, _ in recorded)
            ch = ExecutorChanges(ex.epoch)
            ch.fold(recorded)
            changed = {b for b in range(NUM_BLOCKS) if records0[b] != records1[b]}
            assert changed <= ch.blocks
            hashes = {h for h in index0.keys() | index1.keys() if index0.get(h) != index1.get(h)}
            assert hashes <= ch.hashes
            removed = set(seqs0) - set(seqs1)
            stored = set(seqs1) - set(seqs0)
            grown = {s for s in set(seqs0) & set(seqs1) if seqs0[s] != seqs1[s]}
            assert removed | stored | grown <= ch.seqs
            for sid in grown:  # written from the first change on: nothing before it changed
                (blocks0, hashes0), (blocks1, hashes1) = seqs0[sid], seqs1[sid]
                lo = min(ch.replaced_from.get(sid, NOT_REPLACED), len(blocks0))
                assert _first_difference(blocks0, blocks1) >= lo
                assert hashes1[: len(hashes0)] == hashes0  # chains only grow
    assert {events.BLOCK, events.BLOCKS, events.BLOCK_STORED, events.HASH_REMOVED} <= seen
    assert {events.SEQ_STORED, events.SEQS_GREW, events.SEQ_REPLACED, events.SEQS_REMOVED} <= seen


async def test_registrations_and_nothing_without_a_consumer() -> None:
    m = Manager(track_changes=True)
    assert m.register("ex", 8, 4, "fp") == 1
    assert m.register("ex", 8, 4, "fp") == 2
    assert m.events is not None
    assert events.take(m.events) == [
        (events.EXECUTOR_REGISTERED, ("ex", 0)),
        (events.EXECUTOR_REGISTERED, ("ex", 1)),
    ]
    ex = m.executors["ex"]
    assert ex.events is ex.pool.events == []  # one list per executor epoch, pool included
    # The in-process allocator's core records nothing: no list grows without a consumer.
    plain = LocalAllocator("ex")
    await plain.register(8, 4, "fp")
    await plain.allocate("s", [1, 2, 3, 4, 5])
    ex = plain.manager.executors["ex"]
    assert plain.manager.events is None and ex.events is None and ex.pool.events is None
