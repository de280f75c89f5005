"""The core (Manager + BlockPool) through the in-process allocator: allocation cycles, prefix hits
at block granularity, sharing, copy-on-write, LRU eviction, salts, epochs, bad input."""

from __future__ import annotations

import pytest
from pagemesh.services.kvmanager.api import (
    CommitEntry,
    ExtendEntry,
    InvalidRequest,
    OutOfBlocks,
    StaleEpoch,
)
from pagemesh.services.kvmanager.local import LocalAllocator
from pagemesh.services.kvmanager.manager import Manager

from tests.kvmanager.conftest import BS


async def commit_all(a: LocalAllocator, seq_id: str, tokens: list[int]) -> int:
    """Commits every full block of `tokens` (as the executor does once their KV is written)."""
    entries = [
        CommitEntry(seq_id, i, tokens[i * BS : (i + 1) * BS]) for i in range(len(tokens) // BS)
    ]
    return await a.commit(entries)


def pool(a: LocalAllocator):
    return a.manager.executors[a.executor_id].pool


async def test_allocate_extend_commit_release_cycle(make) -> None:
    a = await make()
    prompt = list(range(10))
    r = await a.allocate("s", prompt, num_lookahead_tokens=2)
    assert r.num_cached_tokens == 0
    assert len(r.block_ids) == 3  # 12 tokens
    assert len(set(r.block_ids)) == 3
    # Decode: tokens 10, 11 fit; token 12 needs a 4th block.
    res = await a.extend([ExtendEntry("s", 10, 12)])
    assert res.updates == {} and res.copies == []
    res = await a.extend([ExtendEntry("s", 12, 13)])
    assert res.updates["s"].first_index == 3 and len(res.updates["s"].block_ids) == 1
    assert await commit_all(a, "s", [*prompt, 10, 11]) == 3
    p = pool(a)
    assert (p.num_in_use, p.num_cached, p.num_free) == (4, 0, 12)
    assert await a.release(["s"]) == 1
    assert (p.num_in_use, p.num_cached, p.num_free) == (0, 3, 13)
    a.manager.check()


@pytest.mark.parametrize(
    ("committed", "prompt_len", "expect"),
    [
        (12, 13, 12),  # all three full blocks hit, the last token is recomputed
        (12, 12, 8),  # a 12-token prompt: the hit stops before the block with its last token
        (12, 9, 8),
        (12, 8, 4),
        (12, 5, 4),
        (12, 4, 0),
        (12, 1, 0),
        (8, 16, 8),  # the hit is as long as the committed chain
    ],
)
async def test_prefix_hit_block_granularity(
    make, committed: int, prompt_len: int, expect: int
) -> None:
    a = await make()
    tokens = list(range(100, 116))
    await a.allocate("s", [*tokens[:committed], 1])
    await commit_all(a, "s", tokens[:committed])
    await a.release(["s"])
    r = await a.allocate("t", tokens[:prompt_len])
    assert r.num_cached_tokens == expect
    assert r.num_cached_tokens < prompt_len
    assert await a.match(tokens[:prompt_len]) == expect
    a.manager.check()


async def test_sharing_across_live_sequences(make) -> None:
    a = await make()
    sys_prompt = list(range(8))
    r1 = await a.allocate("a", [*sys_prompt, 50, 51])
    await commit_all(a, "a", sys_prompt)
    r2 = await a.allocate("b", [*sys_prompt, 60])
    assert r2.num_cached_tokens == 8
    assert r2.block_ids[:2] == r1.block_ids[:2]
    assert r2.block_ids[2] != r1.block_ids[2]
    p = pool(a)
    assert [p.ref[b] for b in r1.block_ids] == [2, 2, 1]
    await a.release(["a"])
    assert [p.ref[b] for b in r2.block_ids] == [1, 1, 1]
    a.manager.check()


async def test_divergent_suffix_only_shares_common_blocks(make) -> None:
    a = await make()
    await a.allocate("a", [1, 2, 3, 4, 5, 6, 7, 8, 9])
    await commit_all(a, "a", [1, 2, 3, 4, 5, 6, 7, 8])
    r = await a.allocate("b", [1, 2, 3, 4, 5, 6, 7, 0, 9])
    assert r.num_cached_tokens == 4


async def test_fork_and_copy_on_write(make) -> None:
    a = await make()
    r = await a.allocate("p", list(range(6)), num_lookahead_tokens=4)  # 3 blocks, 10 slots
    tables = await a.fork("p", ["c1", "c2"], 6)
    assert tables == {"c1": r.block_ids[:2], "c2": r.block_ids[:2]}
    p = pool(a)
    full, partial, own = r.block_ids
    assert (p.ref[full], p.ref[partial], p.ref[own]) == (3, 3, 1)
    # All three write token 6 into the shared partial block: two copy, the last writes in place.
    res = await a.extend([ExtendEntry("c1", 6, 7), ExtendEntry("c2", 6, 7), ExtendEntry("p", 6, 7)])
    assert [s for s, _ in res.copies] == [partial, partial]
    dsts = [d for _, d in res.copies]
    assert len(set(dsts)) == 2 and partial not in dsts
    assert res.updates["c1"].first_index == 1 and res.updates["c1"].block_ids == [dsts[0]]
    assert res.updates["c2"].block_ids == [dsts[1]]
    assert "p" not in res.updates  # ref was 1 by then: it writes in place
    assert p.ref[partial] == 1 and p.ref[full] == 3
    a.manager.check()
    # A full shared block is never written: a fork at a block boundary copies nothing.
    await a.fork("p", ["c3"], 4)
    res = await a.extend([ExtendEntry("c3", 4, 5)])
    assert res.copies == [] and res.updates["c3"].first_index == 1
    a.manager.check()


async def test_lru_eviction_order(make) -> None:
    a = await make(num_blocks=7)
    chains = {}
    for i, base in enumerate((100, 200, 300)):
        toks = list(range(base, base + 8))
        chains[i] = (await a.allocate(f"s{i}", toks)).block_ids  # 2 blocks
        await commit_all(a, f"s{i}", toks)  # both full once decoded
        await a.release([f"s{i}"])
    p = pool(a)
    assert (p.num_cached, p.num_free) == (6, 1)
    # Released tail first: s0's tail is the oldest cached block.
    assert list(p.cached)[:2] == [chains[0][1], chains[0][0]]
    # Touch s0's prefix again: it becomes the most recently used.
    await a.allocate("again", [*range(100, 108), 1])
    await a.release(["again"])
    assert list(p.cached)[-2:] == [chains[0][1], chains[0][0]]
    # Two fresh blocks: the free one, then evict the LRU block, s1's tail.
    r = await a.allocate("new", [7] * 8)
    assert chains[1][1] in r.block_ids and p.evictions == 1
    assert await a.match([*range(200, 208), 1]) == 4
    assert await a.match([*range(300, 308), 1]) == 8
    assert await a.match([*range(100, 108), 1]) == 8
    a.manager.check()


async def test_free_blocks_go_before_cached_ones(make) -> None:
    a = await make(num_blocks=4)
    await a.allocate("s", [*range(8), 1])
    await commit_all(a, "s", list(range(8)))
    await a.release(["s"])
    r = await a.allocate("t", [5])  # 1 block: a free one, no eviction
    assert pool(a).evictions == 0
    assert await a.match([*range(8), 1]) == 8
    assert len(r.block_ids) == 1


async def test_cache_salt_isolation(make) -> None:
    a = await make()
    toks = list(range(9))
    await a.allocate("x", toks, cache_salt="tenant-a")
    await commit_all(a, "x", toks[:8])
    assert (await a.allocate("y", toks, cache_salt="tenant-b")).num_cached_tokens == 0
    assert (await a.allocate("z", toks)).num_cached_tokens == 0
    assert (await a.allocate("w", toks, cache_salt="tenant-a")).num_cached_tokens == 8
    assert await a.match(toks, "tenant-a") == 8
    assert await a.match(toks, "tenant-b") == 0


async def test_model_fingerprint_isolation() -> None:
    m = Manager()
    a, b = LocalAllocator("a", m), LocalAllocator("b", m)
    await a.register(8, BS, "model-a")
    await b.register(8, BS, "model-b")
    await a.allocate("s", list(range(9)))
    await commit_all(a, "s", list(range(8)))
    assert m.match(list(range(9))) == {"a": 8, "b": 0}


async def test_duplicate_commit_keeps_existing_block(make) -> None:
    a = await make()
    toks = list(range(4))
    r1 = await a.allocate("a", [*toks, 9])
    r2 = await a.allocate("b", [*toks, 9])  # allocated before a's commit: no hit
    assert r2.num_cached_tokens == 0
    assert await commit_all(a, "a", toks) == 1
    assert await commit_all(a, "b", toks) == 0  # same hash: the existing block stays indexed
    p = pool(a)
    assert p.hash[r2.block_ids[0]] is None and p.index[p.hash[r1.block_ids[0]]] == r1.block_ids[0]
    await a.release(["b"])
    assert p.num_cached == 0  # b's duplicate went straight back to the free queue
    # Commit continues b-style chains: a's next block still hashes from the shared parent.
    assert (await a.allocate("c", [*toks, 9])).num_cached_tokens == 4
    a.manager.check()


async def test_recommit_is_idempotent_and_order_enforced(make) -> None:
    a = await make()
    toks = list(range(12))
    await a.allocate("s", [*toks, 1])
    assert await a.commit([CommitEntry("s", 0, toks[:4])]) == 1
    assert await a.commit([CommitEntry("s", 0, toks[:4])]) == 0
    with pytest.raises(InvalidRequest, match="in order"):
        await a.commit([CommitEntry("s", 2, toks[8:12])])
    # A batch may carry consecutive blocks of one sequence.
    n = await a.commit([CommitEntry("s", 1, toks[4:8]), CommitEntry("s", 2, toks[8:12])])
    assert n == 2


async def test_stale_epoch_entries_never_hit(make) -> None:
    a = await make()
    toks = list(range(9))
    await a.allocate("s", toks)
    await commit_all(a, "s", toks[:8])
    old_epoch = a.epoch
    assert await a.match(toks) == 8
    new_epoch = await a.register(16, BS, "model-a")
    assert new_epoch == old_epoch + 1
    assert await a.match(toks) == 0
    assert (await a.allocate("t", toks)).num_cached_tokens == 0
    a.epoch = old_epoch
    with pytest.raises(StaleEpoch, match="stale"):
        await a.allocate("u", toks)
    with pytest.raises(StaleEpoch):
        await a.release(["t"])


async def test_out_of_blocks_leaves_state_unchanged(make) -> None:
    a = await make(num_blocks=4)
    await a.allocate("a", [1, 2, 3])
    await a.allocate("b", [4, 5, 6])
    before = a.manager.snapshot()
    with pytest.raises(OutOfBlocks, match="free or evictable"):
        await a.allocate("t", list(range(12)))
    assert a.manager.snapshot() == before
    # A batch is all or nothing: 1 + 2 blocks needed, 2 available.
    with pytest.raises(OutOfBlocks):
        await a.extend([ExtendEntry("a", 3, 8), ExtendEntry("b", 3, 9)])
    assert a.manager.snapshot() == before
    res = await a.extend([ExtendEntry("a", 3, 8), ExtendEntry("b", 3, 4)])
    assert list(res.updates) == ["a"]
    a.manager.check()


async def test_hit_blocks_count_against_evictable_pool(make) -> None:
    """A prompt hitting cached blocks cannot also evict them for its fresh blocks."""
    a = await make(num_blocks=4)
    await a.allocate("s", [*range(8), 1])
    await commit_all(a, "s", list(range(8)))
    await a.release(["s"])  # 2 cached, 2 free
    await a.allocate("x", [99])  # 2 cached, 1 free
    before = a.manager.snapshot()
    with pytest.raises(OutOfBlocks):
        await a.allocate("t", [*range(8), 1, 2, 3, 4, 5])  # 2 hits + 2 fresh > 1 available
    assert a.manager.snapshot() == before
    r = await a.allocate("t", [*range(8), 1, 2])  # 2 hits + 1 fresh
    assert r.num_cached_tokens == 8
    a.manager.check()


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda a: a.allocate("s", [1]), "already exists"),
        (lambda a: a.allocate("", [1]), "seq_id"),
        (lambda a: a.allocate("n", []), "empty"),
        (lambda a: a.allocate("n", [1] * 65), "pool has only 16"),
        (lambda a: a.allocate("n", [1], num_lookahead_tokens=64), "pool has only 16"),
        (lambda a: a.allocate("n", [2**32, 1, 2, 3, 4]), "2\\*\\*32"),
        (lambda a: a.extend([ExtendEntry("nope", 0, 1)]), "unknown sequence"),
        (lambda a: a.extend([ExtendEntry("s", 5, 4)]), "num_computed_tokens"),
        (lambda a: a.extend([ExtendEntry("s", 0, 1000)]), "pool has 16"),
        (lambda a: a.extend([ExtendEntry("s", 1, 9), ExtendEntry("s", 9, 17)]), "twice"),
        (lambda a: a.commit([CommitEntry("nope", 0, [1, 2, 3, 4])]), "unknown sequence"),
        (lambda a: a.commit([CommitEntry("s", 0, [1, 2, 3])]), "expected 4"),
        (lambda a: a.commit([CommitEntry("s", 7, [1, 2, 3, 4])]), "beyond its table"),
        (lambda a: a.fork("nope", ["c"], 1), "unknown parent"),
        (lambda a: a.fork("s", ["s"], 1), "already exists"),
        (lambda a: a.fork("s", ["c", "c"], 1), "duplicate"),
        (lambda a: a.fork("s", ["c"], 100), "holds"),
        (lambda a: a.release(["nope"]), "unknown sequence"),
        (lambda a: a.release(["s", "s"]), "twice"),
    ],
)
async def test_bad_input_is_rejected_without_change(make, call, match: str) -> None:
    a = await make()
    await a.allocate("s", [1, 2, 3, 4, 5])
    before = a.manager.snapshot()
    with pytest.raises(InvalidRequest, match=match):
        await call(a)
    assert a.manager.snapshot() == before


async def test_sequence_too_large_is_both_kinds(make) -> None:
    from pagemesh.services.kvmanager.api import SequenceTooLarge

    a = await make()
    with pytest.raises(SequenceTooLarge) as e:
        await a.allocate("big", [1] * 65)
    assert isinstance(e.value, OutOfBlocks) and isinstance(e.value, InvalidRequest)
    await a.allocate("s", [1])
    with pytest.raises(SequenceTooLarge):
        await a.extend([ExtendEntry("s", 1, 65)])


async def test_double_release(make) -> None:
    a = await make()
    await a.allocate("s", [1, 2, 3, 4, 5])
    assert await a.release(["s"]) == 1
    before = a.manager.snapshot()
    with pytest.raises(InvalidRequest, match="already released"):
        await a.release(["s"])
    assert a.manager.snapshot() == before


async def test_register_validation() -> None:
    a = LocalAllocator("x")
    with pytest.raises(InvalidRequest, match="block_size"):
        await a.register(8, 0, "m")
    with pytest.raises(InvalidRequest, match="num_blocks"):
        await a.register(0, 16, "m")
    with pytest.raises(StaleEpoch, match="not registered"):
        await a.allocate("s", [1])
    assert await a.match([1, 2]) == 0


async def test_stats_windows_and_residency(make) -> None:
    a = await make()
    toks = list(range(9))
    await a.allocate("s", toks, cache_salt="t1")
    await commit_all(a, "s", toks[:8])
    await a.allocate("u", toks, cache_salt="t1")
    st = a.manager.stats
    assert st.overall.total.as_tuple() == (18, 8, 2, 1)
    (name, c), *_ = st.executors["ex"].windows()
    assert name == "since_start" and c.token_hit_rate == pytest.approx(8 / 18)
    assert [w[1].query_requests for w in st.overall.windows()] == [2, 2, 2]
    ex = a.manager.executors["ex"]
    assert ex.age_at_hit.count == 2 and ex.age_at_eviction.count == 0
    assert "t1" not in st.tenants and len(st.tenants) == 1
