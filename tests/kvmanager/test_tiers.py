"""The host-memory tier on kvmanager's side (block_pool.py, DESIGN.md "Memory tiers"), through
the in-process allocator and the gRPC client (Session stream and unary) against a real server:
an evicted cached block spills to a host block, a prompt that hits it gets it restored into a
fresh GPU block with `num_cached_tokens` counting it, the host tier drops its oldest block when
full, an Extend's reply carries its spills too, and a new epoch starts with both tiers empty."""

from __future__ import annotations

import argparse
from collections.abc import Callable

import aiohttp
import pytest
from pagemesh.services.kvmanager import cli
from pagemesh.services.kvmanager.api import AdmitEntry, CommitEntry, ExtendEntry
from pagemesh.services.kvmanager.client import KVManagerClient
from pagemesh.services.kvmanager.manager import Manager
from pagemesh.services.kvmanager.server import start_server

BS = 4


@pytest.fixture
def make(make: Callable) -> Callable:
    """conftest's allocators (in-process, gRPC Session, gRPC unary), registered with a host tier
    of `num_host_blocks` blocks."""

    async def factory(num_blocks: int, num_host_blocks: int):
        return await make(num_blocks, num_host_blocks=num_host_blocks, kv_block_bytes=64)

    return factory


def prompt(k: int, blocks: int = 2) -> list[int]:
    """`blocks` full blocks of ids unique to k, and one more token (never cached itself)."""
    return [1000 * k + i for i in range(blocks * BS)] + [7]


async def served(a, sid: str, ids: list[int]):
    """A whole request: allocate, write (commit its full blocks), release."""
    alloc = await a.allocate(sid, ids)
    full = len(ids) // BS
    await a.commit([CommitEntry(sid, i, ids[i * BS : (i + 1) * BS]) for i in range(full)])
    await a.release([sid])
    return alloc


async def test_evicted_prefix_spills_and_comes_back_from_host(make) -> None:
    a = await make(6, 8)  # GPU: 6 blocks = two prompts of 3 (2 full + 1 partial)
    first = await served(a, "a", prompt(1))
    assert first.num_cached_tokens == 0 and not first.spills and not first.restores
    await served(a, "b", prompt(2))
    # A third prompt needs 4 blocks: the 2 free ones first, then the LRU's 2 oldest cached
    # ones (prompt 1's) are evicted, and each goes to a host block instead of being lost.
    third = await served(a, "c", prompt(3, blocks=3))
    pool = a.manager.executors["ex"].pool
    spilled = dict(third.spills)
    assert set(spilled) == set(first.block_ids[:2])  # prompt 1's cached blocks
    assert pool.num_host_cached == len(spilled)
    # Prompt 1 again: its blocks are found in the host tier, restored into fresh GPU blocks.
    again = await a.allocate("a2", prompt(1))
    assert again.num_cached_tokens == 2 * BS  # host hits count as cached
    assert again.restores, again
    restored = dict(again.restores)  # host block -> GPU block
    assert set(restored) == set(spilled.values())
    assert set(restored.values()) <= set(again.block_ids[:2])
    # The restore frees the host blocks; the hashes are on the GPU blocks again, so a second
    # prompt with the same prefix hits them there, with nothing to copy.
    assert pool.num_host_cached == 0 or not set(restored) & set(pool.host_cached)
    twin = await a.allocate("a3", [*prompt(1)[:-1], 8])
    assert twin.num_cached_tokens == 2 * BS and not twin.restores
    assert twin.block_ids[:2] == again.block_ids[:2]
    ex = a.manager.executors["ex"]
    assert ex.host_hit_tokens == 2 * BS and ex.gpu_hit_tokens == 2 * BS
    a.manager.check()


async def test_host_tier_lru_drops_its_oldest(make) -> None:
    a = await make(3, 4)  # GPU holds one prompt; host holds two prompts' full blocks
    for k in range(1, 5):  # each prompt evicts the one before it to the host tier
        await served(a, f"p{k}", prompt(k))
    pool = a.manager.executors["ex"].pool
    # Prompts 1, 2, 3 were spilled (6 blocks) into 4 host blocks: prompt 1's went first.
    assert pool.num_spills == 6 and pool.host_drops == 2 and pool.num_host_cached == 4
    assert (await a.allocate("p1b", prompt(1))).num_cached_tokens == 0  # dropped: recomputed
    await a.release(["p1b"])
    # Prompt 3 (the newest spill) is still there.
    again = await a.allocate("p3b", prompt(3))
    assert again.num_cached_tokens == 2 * BS and len(again.restores) == 2
    a.manager.check()


async def test_extend_reply_carries_its_spills(make) -> None:
    a = await make(4, 4)
    await served(a, "x", prompt(1))  # 2 cached blocks, 1 free... and 1 untouched
    alloc = await a.allocate("y", [5, 5])  # one block
    # Growing y by 3 blocks takes the free one, then evicts both cached blocks of prompt 1.
    r = await a.extend([ExtendEntry("y", 2, 4 * BS)])
    assert len(r.spills) == 2 and r.updates["y"].first_index == 1
    assert {g for g, _ in r.spills} <= set(r.updates["y"].block_ids)
    assert alloc.block_ids[0] not in {g for g, _ in r.spills}
    a.manager.check()


async def test_step_spills_ahead_within_budget_and_eviction_moves_nothing(make) -> None:
    """A Step call that changes blocks ends by copying the oldest cached blocks out (while free
    and copied ones are below the watermark, at most its budget): they stay cached and hit on
    the GPU; evicting one later moves no bytes, and its hash goes on in its host copy."""
    a = await make(8, 8)
    m = a.manager
    m.spill_ahead_watermark = 0.5  # 4 of 8 GPU blocks free or copied
    m.spill_ahead_mib = 64 / 2**20  # one 64-byte block a call
    for k in (1, 2, 3):
        await served(a, f"p{k}", prompt(k))  # 6 cached blocks (2 a prompt), 2 free
    pool = m.executors["ex"].pool
    oldest = list(pool.cached)
    r = await a.step([], [], [], [AdmitEntry("x", [9] * 9, "", 0)])  # 3 blocks: 1 evicted
    (alloc,) = r.allocations
    assert [g for g, _ in alloc.spills] == oldest[:1]  # the eviction's own spill
    assert [g for g, _ in r.spills_ahead] == oldest[1:2]  # the budget: one block
    r = await a.step([], ["x"], [])  # (x's blocks come back free: 3 free + 1 copied)
    assert r.num_released == 1 and not r.spills_ahead  # at the watermark: nothing to copy
    r = await a.step([], [], [], [AdmitEntry("y", [8] * 17, "", 0)])  # 5 blocks: 2 evicted
    (alloc,) = r.allocations
    # oldest[1] had its copy: only oldest[2] is spilled.
    assert [g for g, _ in alloc.spills] == oldest[2:3]
    assert pool.num_evicted_ahead == 1 and pool.num_spills_ahead == 1 + len(r.spills_ahead)
    if hasattr(a, "get_stats"):  # (gRPC: the counters in GetStats)
        t = (await a.get_stats()).executors[0].tier
        assert (t.spills_ahead, t.evicted_ahead) == (pool.num_spills_ahead, 1)
        assert t.host_copies == pool.num_host_copies
    # Prompt 1's two blocks are both in the host tier now (one by spill, one by its copy).
    again = await a.allocate("p1b", prompt(1))
    assert again.num_cached_tokens == 2 * BS and len(again.restores) == 2
    m.check()


async def test_new_epoch_drops_both_tiers(make) -> None:
    a = await make(3, 4)
    await served(a, "p1", prompt(1))
    await served(a, "p2", prompt(2))
    pool = a.manager.executors["ex"].pool
    assert pool.num_host_cached == 2 and len(pool.index) == 2
    await a.register(3, BS, "fp", num_host_blocks=4)  # the executor restarted
    pool = a.manager.executors["ex"].pool
    assert pool.num_host_cached == 0 and not pool.index and pool.num_host_free == 4
    assert (await a.allocate("q", prompt(1))).num_cached_tokens == 0
    assert await a.match(prompt(2)) == 0


async def test_no_host_tier_by_default(make) -> None:
    a = await make(3, 0)
    await served(a, "p1", prompt(1))
    r = await served(a, "p2", prompt(2))
    assert not r.spills and a.manager.executors["ex"].pool.evictions == 2
    assert (await a.allocate("p1b", prompt(1))).num_cached_tokens == 0


async def test_reconcile_keeps_the_host_tier_only_when_the_transfers_agree(make) -> None:
    a = await make(3, 4)
    await served(a, "p1", prompt(1))
    await served(a, "p2", prompt(2))  # prompt 1's 2 blocks spilled
    pool = a.manager.executors["ex"].pool
    assert pool.num_host_cached == 2
    assert await a.reconcile({}, 2) == (0, [])  # the executor got both spills: kept
    assert pool.num_host_cached == 2
    assert await a.reconcile({}, 1) == (0, [])  # one reply lost: nothing trusted
    assert pool.num_host_cached == 0 and pool.num_host_free == 4
    await served(a, "p3", prompt(3))
    assert pool.num_host_cached == 2
    assert await a.reconcile({}) == (0, [])  # no count sent: dropped
    assert pool.num_host_cached == 0
    assert (await a.allocate("again", prompt(2))).num_cached_tokens == 0
    a.manager.check()


async def test_tier_stats_in_get_stats_metrics_and_cli(capsys) -> None:
    srv = await start_server(port=0, metrics_port=0)
    a = KVManagerClient(f"127.0.0.1:{srv.port}", "ex")
    try:
        await a.register(3, BS, "fp", num_host_blocks=4, kv_block_bytes=1000)
        await served(a, "p1", prompt(1))
        await served(a, "p2", prompt(2))  # prompt 1 spilled (2 blocks)
        await served(a, "p3", prompt(3))  # prompt 2 spilled (2 more: host full)
        await served(a, "p1b", prompt(1))  # restored (2), prompt 3 spilled (2): host holds 4
        await served(a, "p4", prompt(4))  # prompt 1 spilled again: 2 of prompt 2's dropped
        (ex,) = (await a.get_stats()).executors
        t = ex.tier
        assert (t.host_blocks, t.host_free, t.host_cached) == (4, 0, 4)
        assert (t.spills, t.restores, t.host_drops) == (8, 2, 2)
        assert (t.gpu_hit_tokens, t.host_hit_tokens) == (0, 2 * BS)
        assert (t.bytes_spilled, t.bytes_restored) == (8000, 2000)
        assert t.age_at_restore.count == 2 and t.age_at_host_drop.count == 2
        async with (
            aiohttp.ClientSession() as http,
            http.get(f"http://127.0.0.1:{srv.metrics_port}/metrics") as resp,
        ):
            text = await resp.text()
        assert 'pagemesh_kv_tier_hit_tokens_total{executor="ex",tier="host"} 8.0' in text
        assert 'pagemesh_kv_tier_transfers_total{executor="ex",kind="spill"} 8.0' in text
        assert 'pagemesh_kv_tier_transfers_total{executor="ex",kind="drop"} 2.0' in text
        # (no Step call here: nothing spilled ahead; test_step_spills_ahead_... does)
        assert 'pagemesh_kv_tier_transfers_total{executor="ex",kind="spill_ahead"} 0.0' in text
        assert 'pagemesh_kv_host_blocks{executor="ex",state="copy"} 0.0' in text
        assert 'pagemesh_kv_tier_bytes_total{direction="to_gpu",executor="ex"} 2000.0' in text
        assert 'pagemesh_kv_host_blocks{executor="ex",state="cached"} 4.0' in text
        assert 'pagemesh_kv_host_block_age_at_restore_seconds_count{executor="ex"} 2.0' in text
        args = argparse.Namespace(address=f"127.0.0.1:{srv.port}", executor="", json=False)
        args.watch = None
        assert await cli._stats(args) == 0
        out = capsys.readouterr().out
        assert "host tier" in out and "9.8 KiB" in out and "host at restore" in out
    finally:
        await a.close()
        await srv.stop(0)


async def test_spill_ahead_options_are_checked() -> None:
    parser = argparse.ArgumentParser()
    cli.add_commands(parser.add_subparsers())
    args = parser.parse_args(["kvmanager"])
    assert (args.spill_ahead_watermark, args.spill_ahead_mib) == (0.25, 32.0)
    for bad in (["--spill-ahead-watermark", "1.5"], ["--spill-ahead-mib", "-1"]):
        args = parser.parse_args(["kvmanager", "--port", "0", *bad])
        assert await cli._serve(args) == 78  # EX_CONFIG, before anything starts
    with pytest.raises(ValueError, match="spill_ahead_watermark"):
        Manager(spill_ahead_watermark=-0.1)
