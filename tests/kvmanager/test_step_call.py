"""The per-step call (`step`: commit, release, extend in one message) on every allocator of the
`make` fixture (in-process, gRPC Session, gRPC unary): parts apply in order, each on its own, as
the three calls sent back to back would."""

from __future__ import annotations

from pagemesh.services.kvmanager.api import (
    AdmitEntry,
    CommitEntry,
    ExtendEntry,
    InvalidRequest,
    OutOfBlocks,
    UnknownSequence,
)

from tests.kvmanager.conftest import BS


async def test_parts_apply_in_order_commit_release_extend(make) -> None:
    a = await make(num_blocks=8)
    prompt = list(range(100, 109))  # 2 full blocks + 1 token
    await a.allocate("a", prompt)
    await a.allocate("b", [7] * 5)  # 2 blocks
    commits = [CommitEntry("a", i, prompt[i * BS : (i + 1) * BS]) for i in range(2)]
    # The release of "a" comes after its commits in the same call: its blocks become cached
    # (hashed) rather than free. "b" grows by two blocks.
    r = await a.step(commits, ["a"], [ExtendEntry("b", 5, 16)])
    assert (r.num_published, r.num_released) == (2, 1)
    assert r.commit_error is r.release_error is r.extend_error is None
    assert r.extend is not None and list(r.extend.updates) == ["b"]
    assert len(r.extend.updates["b"].block_ids) == 2
    # What the commit published is there for the next prompt with this prefix.
    hit = await a.allocate("c", [*prompt[:8], 1, 2])
    assert hit.num_cached_tokens == 8
    ex = a.manager.executors[a.executor_id]
    assert "a" not in ex.seqs and len(ex.seqs["b"].blocks) == 4


async def test_a_failed_part_leaves_the_others_applied(make) -> None:
    a = await make(num_blocks=4)
    await a.allocate("s", [1, 2, 3, 4, 5])  # 2 blocks
    await a.allocate("t", [9] * 4)  # 1 block: 1 of 4 left
    r = await a.step(
        [CommitEntry("nope", 0, [1, 2, 3, 4])],  # unknown sequence
        ["t"],  # fine
        [ExtendEntry("s", 5, 20)],  # needs 3 more blocks; 2 are free after the release
    )
    assert isinstance(r.commit_error, UnknownSequence)
    assert r.num_released == 1 and r.release_error is None
    assert isinstance(r.extend_error, OutOfBlocks) and r.extend is None
    ex = a.manager.executors[a.executor_id]
    assert "t" not in ex.seqs
    assert len(ex.seqs["s"].blocks) == 2, "a failed extend changes nothing"
    # A bad release fails on its own too, and an empty part is not applied at all.
    r = await a.step([], ["s", "s"], [])
    assert isinstance(r.release_error, InvalidRequest) and "twice" in str(r.release_error)
    assert r.extend is None and r.extend_error is None and r.num_published == 0
    assert "s" in ex.seqs


async def test_empty_call_changes_nothing(make) -> None:
    a = await make()
    await a.allocate("s", [1, 2, 3])
    before = a.manager.snapshot()
    r = await a.step([], [], [])
    assert (r.num_published, r.num_released, r.extend) == (0, 0, None)
    assert a.manager.snapshot() == before


async def test_admissions_stop_at_the_token_budget_or_the_first_failure(make) -> None:
    a = await make(num_blocks=16)
    prefix = list(range(500, 508))  # 2 blocks, committed below
    await a.allocate("p", [*prefix, 1])
    await a.commit([CommitEntry("p", i, prefix[i * BS : (i + 1) * BS]) for i in range(2)])
    admits = [AdmitEntry(f"s{i}", [*prefix, 10 + i, 20 + i]) for i in range(5)]
    # Each is 10 tokens, 8 of them cached: 2 uncached each. A budget of 5 takes three (the
    # third is admitted with 4 used: the budget bounds where the list stops, as the executor's
    # chunking does), in order.
    r = await a.step([], [], [], admits, admit_token_budget=5)
    assert [x.num_cached_tokens for x in r.allocations] == [8, 8, 8]
    assert r.allocate_error is None
    ex = a.manager.executors[a.executor_id]
    assert {"s0", "s1", "s2"} <= set(ex.seqs) and "s3" not in ex.seqs
    # No budget: all that fit, stopping at the first that does not (blocks: 16 in all).
    big = [AdmitEntry("b0", [7] * 12), AdmitEntry("b1", [8] * 40), AdmitEntry("b2", [9] * 2)]
    r = await a.step([], [], [], big)
    assert len(r.allocations) == 1 and isinstance(r.allocate_error, OutOfBlocks)
    assert "b0" in ex.seqs and "b1" not in ex.seqs and "b2" not in ex.seqs
