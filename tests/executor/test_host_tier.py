"""The executor's host-memory tier (host_tier.py) on CPU: spills and restores move a block's KV
bit for bit between the pools (all layers of a block contiguous on the host side), batches
merge only where the order of their copies cannot matter, and an engine whose small GPU pool
evicted a prompt's blocks gets them back from the host tier, counted as cached and giving the
same greedy tokens as the cold run."""

from __future__ import annotations

import random
from pathlib import Path
from types import SimpleNamespace
from typing import cast

import pytest
import torch
from pagemesh.services.executor.config import EngineConfig
from pagemesh.services.executor.host_tier import (
    NUM_SLOTS,
    HostTier,
    TransferBatch,
    _in_host_order,
    _merge,
    _runs,
    host_blocks_for,
    staging_blocks_for,
)
from pagemesh.services.executor.kv_pool import KVPool, pool_blocks_for_budget
from pagemesh.services.executor.model.config import ModelConfig
from pagemesh.services.kvmanager.manager import Manager

from tests.executor.engine_support import Run, assert_all_free_or_cached, make_engine, run_all
from tests.executor.test_engine_greedy import SYSTEM, _ids, greedy


def small_pool(num_blocks: int = 6) -> KVPool:
    # KVPool reads only these of a ModelConfig.
    mc = cast(ModelConfig, SimpleNamespace(num_layers=3, num_kv_heads=1, head_dim=4))
    pool = KVPool(mc, num_blocks, 4, torch.float32, torch.device("cpu"))
    pool.storage.copy_(torch.randn_like(pool.storage))
    return pool


def block(pool: KVPool, b: int) -> torch.Tensor:
    """GPU block b, all layers' K and V."""
    return pool.storage[:, :, b].clone()


def test_spill_then_restore_is_bit_exact_and_host_blocks_are_contiguous() -> None:
    pool = small_pool()
    tier = HostTier(pool, 4, torch.device("cpu"))
    assert tier.blocks[0].is_contiguous() and tier.blocks.shape[1:3] == (3, 2)
    before = {b: block(pool, b) for b in range(6)}
    tier.run([TransferBatch(spills=[(1, 2), (4, 0)])])
    assert torch.equal(tier.blocks[2], before[1]) and torch.equal(tier.blocks[0], before[4])
    pool.storage[:, :, 1].zero_()  # the GPU block is reused for something else
    # One reply: block 3 is evicted (to host 1) and refilled from host 2 (block 1's old KV).
    tier.run([TransferBatch(spills=[(3, 1)], restores=[(2, 3), (0, 5)])])
    assert torch.equal(tier.blocks[1], before[3])
    assert torch.equal(block(pool, 3), before[1]) and torch.equal(block(pool, 5), before[4])
    for b in (0, 2, 4):
        assert torch.equal(block(pool, b), before[b])  # nothing else touched
    assert tier.num_spills == 3 and tier.num_restores == 2
    assert tier.bytes_moved == 5 * 3 * 2 * 4 * 1 * 4 * 4


def test_batches_merge_only_when_order_cannot_matter() -> None:
    a = TransferBatch(spills=[(1, 5)], restores=[(2, 3)])
    independent = TransferBatch(spills=[(4, 6)], restores=[(7, 8)])
    assert len(_merge([a, independent])) == 1
    # A restore of what an earlier batch spilled: a group's spills run first, so it joins.
    assert len(_merge([a, TransferBatch(restores=[(5, 9)])])) == 1
    # A spill into the host block an earlier batch restores from must wait for that read.
    assert len(_merge([a, TransferBatch(spills=[(8, 2)])])) == 2
    # A spill of a block an earlier batch restored into must read the restored KV.
    assert len(_merge([a, TransferBatch(spills=[(3, 0)])])) == 2
    # The same block written twice (host, then GPU) stays in two groups.
    assert len(_merge([a, TransferBatch(spills=[(9, 5)])])) == 2
    assert len(_merge([a, TransferBatch(restores=[(0, 3)])])) == 2
    assert _merge([TransferBatch(), TransferBatch()]) == []
    # Replayed through the tier, split groups give what the batches one by one give.
    pool = small_pool(10)
    tier = HostTier(pool, 10, torch.device("cpu"))
    ref_pool = small_pool(10)
    ref_pool.storage.copy_(pool.storage)
    ref = HostTier(ref_pool, 10, torch.device("cpu"))
    tier.blocks.zero_()  # (allocated empty: only spilled blocks are ever read)
    ref.blocks.zero_()
    batches = [
        TransferBatch(spills=[(1, 5), (2, 6)]),
        TransferBatch(spills=[(3, 7)], restores=[(5, 1)]),
        TransferBatch(spills=[(1, 8)], restores=[(6, 3), (7, 2)]),
        TransferBatch(spills=[(4, 6)], restores=[(8, 4)]),  # host 6 again, once 3 read it
    ]
    tier.run(batches)
    for b in batches:
        ref.run([b])
    assert torch.equal(pool.storage, ref_pool.storage) and torch.equal(tier.blocks, ref.blocks)


def random_batches(rng: random.Random, n_gpu: int, n_host: int) -> list[TransferBatch]:
    """Replies as kvmanager makes them: distinct blocks within a copy direction, and no host
    block both a spill target and a restore source of one reply."""
    out = []
    for _ in range(rng.randrange(1, 6)):
        hosts = rng.sample(range(n_host), rng.randrange(0, 5))
        cut = rng.randrange(len(hosts) + 1)
        spills = list(zip(rng.sample(range(n_gpu), cut), hosts[:cut], strict=True))
        restores = list(zip(hosts[cut:], rng.sample(range(n_gpu), len(hosts) - cut), strict=True))
        out.append(TransferBatch(spills, restores))
    return out


def test_merged_groups_replay_like_batches_one_by_one() -> None:
    rng = random.Random(5)
    pool, ref_pool = small_pool(8), small_pool(8)
    # Pieces of 2 blocks (the staging slots' size on CUDA), each slicing the call's indices.
    tier = HostTier(pool, 8, torch.device("cpu"), staging_blocks=4 * NUM_SLOTS)
    ref = HostTier(ref_pool, 8, torch.device("cpu"))
    for _ in range(200):
        ref_pool.storage.copy_(pool.storage)
        ref.blocks.copy_(tier.blocks.copy_(torch.randn_like(tier.blocks)))
        batches = random_batches(rng, 8, 8)
        tier.run(batches)
        for b in batches:
            ref.run([b])
        assert torch.equal(pool.storage, ref_pool.storage) and torch.equal(tier.blocks, ref.blocks)


def test_runs_of_consecutive_host_blocks() -> None:
    assert _runs([]) == []
    assert _runs([4, 5, 6, 9, 3, 4]) == [(0, 4, 3), (3, 9, 1), (4, 3, 2)]
    # A chain's restores come in chain order, which is descending host order (released tail
    # first, spilled in that order): copied in host order, they are one run, not one a block.
    chain = [(12, 30), (11, 31), (10, 32), (4, 33)]
    ordered = _in_host_order(TransferBatch(restores=list(chain))).restores
    assert ordered == sorted(chain) and _runs([h for h, _ in ordered]) == [(0, 4, 1), (1, 10, 3)]


def test_a_returning_chain_is_restored_in_one_copy() -> None:
    """kvmanager's order, end to end: a chain evicted from a small pool and allocated again
    lists its restores in descending host order (one copy a block, as listed); in host order
    they are one run."""
    m = Manager()
    epoch = m.register("e", 8, 4, "fp", "", "", 0, 32, 1024)
    chains = {name: [k * 100 + i for i in range(21)] for k, name in enumerate("ab", 1)}
    for name, ids in chains.items():  # b's allocation evicts a's 5 full blocks to host
        m.allocate("e", epoch, name, ids)
        m.commit("e", epoch, [(name, i, ids[i * 4 : (i + 1) * 4]) for i in range(5)])
        m.release("e", epoch, [name])
    alloc = m.allocate("e", epoch, "a2", chains["a"])
    # (a's tail went to host: its last 3 full blocks; the first 2 are still on the GPU)
    assert alloc.num_cached_tokens == 20 and len(alloc.restores) == 3
    assert len(_runs([h for h, _ in alloc.restores])) == 3
    ordered = _in_host_order(TransferBatch(restores=list(alloc.restores))).restores
    assert len(_runs([h for h, _ in ordered])) == 1


def test_host_tier_size() -> None:
    assert host_blocks_for(0.0, 0, 1024) == 0
    assert host_blocks_for(1.0, 0, 1 << 20) == 1024
    assert host_blocks_for(1.0, 7, 1 << 20) == 7  # blocks win
    # Device staging: the MiB asked for, split in two rings of NUM_SLOTS slots...
    assert staging_blocks_for(256, 512 << 10, 8192, 16, 256) == 512
    # ... each ring no larger than a step can move (4096 / 16 + 16 = 272 blocks) ...
    assert staging_blocks_for(1 << 20, 512 << 10, 4096, 16, 16) == 2 * 272
    # ... and a block a slot at least.
    assert staging_blocks_for(1, 64 << 20, 8192, 16, 256) == 2 * NUM_SLOTS
    # The GPU pool's budget leaves the staging out: 1000 blocks fewer for 1000 blocks' bytes.
    full = pool_blocks_for_budget(80 << 30, 0.9, 10 << 30, 1 << 19)
    assert (
        full - pool_blocks_for_budget(80 << 30, 0.9, (10 << 30) + 1000 * (1 << 19), 1 << 19) == 1000
    )
    with pytest.raises(ValueError, match="once"):
        EngineConfig(model="m", device="cpu", host_kv_blocks=4, host_kv_gib=1.0)
    with pytest.raises(ValueError, match=">= 0"):
        EngineConfig(model="m", device="cpu", host_kv_blocks=-1)
    with pytest.raises(ValueError, match="staging"):
        EngineConfig(model="m", device="cpu", host_kv_staging_mib=0)


async def run_counting(engine, rid: str, on_step=None) -> tuple[Run, int]:
    """run_all, and the number of steps until `rid`'s first token came out."""
    run, steps, first = Run(), 0, 0
    while engine.has_unfinished_requests():
        outputs = await engine.step()
        steps += 1
        run.add(outputs)
        if on_step is not None:
            on_step(engine)
        if not first and any(o.request_id == rid and o.token_ids for o in outputs):
            first = steps
    return run, first


QUESTIONS = [
    "What is a prime number?",
    "Name a famous bridge.",
    "How do magnets work?",
    "Why is the sky blue?",
]


async def test_evicted_prefix_comes_back_from_host_tier(smollm2_path: Path) -> None:
    """A 24-block GPU pool holds about one conversation: each new prompt evicts the one before
    it, to the host tier. The first prompt, asked again, is restored from there: its cached
    tokens count the restored blocks, and its greedy tokens equal its cold run's. kvmanager
    spills ahead of eviction (two blocks a Step call at most, here), so some evictions find
    their block's copy made already and move no bytes; the restored KV is the same."""
    engine = await make_engine(smollm2_path, num_blocks=24, host_kv_blocks=64)
    tier = engine.runner.host_tier
    assert tier is not None
    # The question first: no two prompts share a block, so each one's blocks get evicted.
    prompts = [_ids(smollm2_path, q + " " + SYSTEM * 3) for q in QUESTIONS]
    assert len(prompts[0]) > 8 * 16  # more than a third of the pool
    ex = engine.allocator.manager.executors[engine.allocator.executor_id]
    engine.allocator.manager.spill_ahead_mib = 2 * ex.kv_block_bytes / 2**20
    ahead_per_call: list[int] = []
    step = engine.allocator.step

    async def counting_step(*args, **kwargs):
        result = await step(*args, **kwargs)
        ahead_per_call.append(len(result.spills_ahead))
        return result

    engine.allocator.step = counting_step  # type: ignore[method-assign]
    storage = engine.runner.pool.storage
    kv: dict[bytes, torch.Tensor] = {}  # each published hash's KV, as computed cold

    def record() -> None:
        for b, h in enumerate(ex.pool.hash):
            if h is not None:
                kv.setdefault(h, storage[:, :, b].clone())

    cold = {}
    for i, p in enumerate(prompts):
        engine.add_request(f"r{i}", p, greedy(8))
        run = await run_all(engine, on_step=lambda _: record())
        cold[i] = run.tokens[(f"r{i}", 0)]
    # (the last call's spills ahead wait for the next step: none runs without one)
    pending = sum(len(b.spills) for b in engine.scheduler.pending_transfers)
    assert ex.pool.num_spills > 0 and tier.num_spills + pending == ex.pool.num_spills
    assert ex.pool.num_host_cached > 0
    # Spills ahead: within the budget a call, and evictions that found a copy moved nothing
    # (the executor ran exactly the spills kvmanager made, counted above).
    assert max(ahead_per_call) == 2 and ex.pool.num_spills_ahead == sum(ahead_per_call)
    assert ex.pool.num_evicted_ahead > 0
    # The last prompt is still on the GPU: a plain GPU hit, for the step count below.
    engine.add_request("resident", prompts[-1], greedy(8))
    resident, resident_steps = await run_counting(engine, "resident")
    assert resident.tokens[("resident", 0)] == cold[len(prompts) - 1]
    assert ex.host_hit_tokens == 0 and resident_steps > 0
    engine.add_request("again", prompts[0], greedy(8))
    table: list[int] = []

    def hit_blocks(_) -> None:
        for seq in engine.scheduler.running:
            if not table and seq.request.request_id == "again":
                table.extend(seq.block_table[: seq.num_cached_tokens // 16])

    run, steps = await run_counting(engine, "again", hit_blocks)
    assert run.tokens[("again", 0)] == cold[0]
    # A restore costs no step: the first token comes as soon as a GPU hit's does.
    assert steps == resident_steps
    cached = run.outputs[-1].num_cached_tokens
    full = (len(prompts[0]) - 1) // 16 * 16
    assert cached == full  # every full block: on the GPU or restored, none recomputed
    assert ex.host_hit_tokens > 0 and tier.num_restores == ex.pool.num_restores > 0
    # Every block the prompt hit, restored ones included, holds its cold KV bit for bit (the
    # blocks after them are recomputed, in another batch shape: equal only within rounding).
    assert len(table) == full // 16
    for b in table:
        h = ex.pool.hash[b]
        assert h is not None and torch.equal(storage[:, :, b], kv[h]), f"block {b}"
    assert_all_free_or_cached(engine)
    ex.pool.check()


async def test_no_host_tier_by_default(smollm2_path: Path) -> None:
    engine = await make_engine(smollm2_path, num_blocks=24)
    assert engine.runner.host_tier is None
    ex = engine.allocator.manager.executors[engine.allocator.executor_id]
    assert ex.num_host_blocks == 0
