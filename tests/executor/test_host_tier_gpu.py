"""The host tier on CUDA (host_tier.py): spills and restores are bit-exact in stream order (the
compute stream's later work sees them, compute work queued ahead of them included) through a
staging buffer smaller than the transfer (slots reused), and `run` never waits for the device;
the GPU pool's profiled size leaves room for the tier's staging; and a CUDA engine (graphs,
async scheduling) whose small pool evicted a prompt restores it from pinned host memory with
the same greedy tokens as its cold run. Skipped without a GPU."""

from __future__ import annotations

import random
from pathlib import Path
from types import SimpleNamespace
from typing import cast

import pytest
import torch
from pagemesh.services.executor.config import EngineConfig
from pagemesh.services.executor.engine import LLMEngine
from pagemesh.services.executor.engine_api import SamplingParams
from pagemesh.services.executor.host_tier import NUM_SLOTS, HostTier, TransferBatch
from pagemesh.services.executor.kv_pool import KVPool, bytes_per_block, determine_num_blocks
from pagemesh.services.executor.model.config import ModelConfig
from pagemesh.services.executor.staging import PinnedStaging
from pagemesh.services.kvmanager.local import LocalAllocator

from tests.executor.engine_support import run_all
from tests.executor.test_engine_gpu import random_llama  # noqa: F401  (the fixture)
from tests.executor.test_host_tier import random_batches

pytestmark = pytest.mark.gpu


def test_transfers_are_exact_in_stream_order_without_a_host_wait() -> None:
    dev = torch.device("cuda")
    mc = cast(ModelConfig, SimpleNamespace(num_layers=4, num_kv_heads=2, head_dim=64))
    pool = KVPool(mc, 64, 16, torch.bfloat16, dev)
    pool.storage.copy_(torch.randn_like(pool.storage))
    tier = HostTier(pool, 48, dev, staging_blocks=16)  # slots of 2 blocks: 15 pieces a run
    assert tier.blocks.is_pinned() and tier.staging_bytes == 16 * tier.block_bytes
    before = pool.storage.clone()
    staging = PinnedStaging(dev)  # the engine's index uploads (a fresh pinned block would wait)
    staging.next_step()
    # Compute-stream work queued ahead (a step in flight) writes block 0 last: the gather must
    # see its final value, and `run` must not wait for it.
    big = torch.randn(4096, 4096, device=dev)
    for _ in range(16):
        big = big @ big / 64
    pool.storage[:, :, 0] = 1.5
    # GPU blocks 0..29 -> host blocks 10..39 (one run of consecutive host blocks).
    torch.cuda.set_sync_debug_mode("error")  # any host wait for the device raises
    try:
        tier.run([TransferBatch(spills=[(b, b + 10) for b in range(30)])], staging.to_device)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    pool.storage[:, :, :30] = 0  # the next step reuses the evicted blocks
    # Host blocks 10..39 -> GPU blocks 30..59.
    tier.run([TransferBatch(restores=[(h, h + 20) for h in range(10, 40)])], staging.to_device)
    # At once, GPU blocks 60..63 -> host blocks 10..13, which the restores may still be reading.
    tier.run([TransferBatch(spills=[(b, b - 50) for b in range(60, 64)])], staging.to_device)
    got = pool.storage[:, :, 30:60].clone()  # read on the compute stream
    want = before[:, :, :30].clone()
    want[:, :, 0] = 1.5
    assert torch.equal(got, want)
    tier.synchronize()
    assert torch.equal(tier.blocks[10:14], before[:, :, 60:64].permute(2, 0, 1, 3, 4, 5).cpu())
    assert tier.num_spills == 34 and tier.num_restores == 30


def test_random_transfers_match_the_cpu_tier() -> None:
    """Calls of several merged groups, in pieces of 2 blocks (staging slots reused within a
    call, both copy streams ordered on shared host blocks), against the CPU tier on a copy."""
    dev = torch.device("cuda")
    mc = cast(ModelConfig, SimpleNamespace(num_layers=2, num_kv_heads=1, head_dim=8))
    pool = KVPool(mc, 8, 4, torch.float32, dev)
    pool.storage.copy_(torch.randn_like(pool.storage))
    tier = HostTier(pool, 8, dev, staging_blocks=4 * NUM_SLOTS)
    ref_pool = KVPool(mc, 8, 4, torch.float32, torch.device("cpu"))
    ref = HostTier(ref_pool, 8, torch.device("cpu"))
    ref_pool.storage.copy_(pool.storage.cpu())
    tier.blocks.zero_()
    ref.blocks.zero_()
    staging = PinnedStaging(dev)
    rng = random.Random(7)
    for i in range(100):
        staging.next_step()
        batches = random_batches(rng, 8, 8)
        tier.run(batches, staging.to_device)
        ref.run(batches)
        if i % 2:  # every other call lands before the next: the rest queue behind each other
            tier.synchronize()
    tier.synchronize()
    assert torch.equal(pool.storage.cpu(), ref_pool.storage) and torch.equal(
        tier.blocks, ref.blocks
    )


def test_profiled_pool_leaves_room_for_the_staging() -> None:
    dev = torch.device("cuda")
    # 2 MiB blocks, so that the device's free memory moving by a few pages is within a block.
    mc = cast(ModelConfig, SimpleNamespace(num_layers=32, num_kv_heads=8, head_dim=128))
    config = EngineConfig(model="m", device="cuda", gpu_memory_utilization=0.5)
    per_block = bytes_per_block(mc, config.block_size, torch.bfloat16)
    assert per_block == 2 << 20
    plain = determine_num_blocks(config, mc, torch.bfloat16, dev, lambda: None)
    less = determine_num_blocks(config, mc, torch.bfloat16, dev, lambda: None, 100 * per_block)
    assert plain - less in (99, 100, 101)


def test_transfers_are_queued_without_waiting_for_the_step_in_flight() -> None:
    """`run` only queues: its block ids go up without a stream sync (a pageable index copy
    synchronized the side stream, which waits for the compute stream's step in flight, so the
    launch of the step that reads the restores stalled the host for that step and the
    restores). Through the default path and through the runner's pinned staging."""
    from pagemesh.services.executor.staging import PinnedStaging

    dev = torch.device("cuda")
    mc = cast(ModelConfig, SimpleNamespace(num_layers=4, num_kv_heads=2, head_dim=64))
    pool = KVPool(mc, 64, 16, torch.bfloat16, dev)
    pool.storage.copy_(torch.randn_like(pool.storage))
    tier = HostTier(pool, 48, dev)
    tier.run([TransferBatch(spills=[(b, b) for b in range(20)])])  # host 0..19 hold KV
    # ... and once the shape measured below: PyTorch's pinned allocator has its blocks cached
    # (a first cudaHostAlloc may wait for the device, which is no part of what is tested).
    tier.run(
        [
            TransferBatch(
                spills=[(40 + i, 30 + i) for i in range(10)],
                restores=[(10 + i, 40 + i) for i in range(10)],
            )
        ]
    )
    torch.cuda.synchronize()
    staging = PinnedStaging(dev)
    for upload in (None, staging.to_device):
        staging.next_step()
        before = pool.storage.clone()
        big = torch.randn(8192, 8192, device=dev)
        for _ in range(12):  # a step in flight: far longer than queueing a few copies
            big = big @ big / 90
        busy = torch.cuda.Event()
        busy.record()
        # One reply: GPU blocks 40..49 evicted to host 20..29, host 0..9 restored into them.
        tier.run(
            [
                TransferBatch(
                    spills=[(40 + i, 20 + i) for i in range(10)],
                    restores=[(i, 40 + i) for i in range(10)],
                )
            ],
            upload,
        )
        assert not busy.query(), "run() waited for the compute stream"
        got = pool.storage[:, :, 40:50].clone()
        tier.synchronize()
        assert torch.equal(got, tier.blocks[0:10].to(dev).permute(1, 2, 0, 3, 4, 5))
        assert torch.equal(
            tier.blocks[20:30].to(dev).permute(1, 2, 0, 3, 4, 5), before[:, :, 40:50]
        )
        tier.run([TransferBatch(spills=[(40 + i, i) for i in range(10)])])  # host 0..9 again
        torch.cuda.synchronize()


async def test_cuda_engine_restores_from_pinned_host(random_llama: Path) -> None:  # noqa: F811
    torch.backends.cuda.matmul.allow_tf32 = False
    rng = random.Random(3)
    prompts = [[rng.randrange(4096) for _ in range(200)] for _ in range(4)]
    config = EngineConfig(
        model=str(random_llama),
        device="cuda",
        dtype="float32",
        num_blocks=32,  # ~2 prompts: each new one evicts the oldest
        host_kv_blocks=128,
        async_scheduling=True,
    )
    engine = LLMEngine(config, LocalAllocator())
    await engine.start()
    tier = engine.runner.host_tier
    assert tier is not None and tier.staging_bytes > 0  # (the pool's sizing sets it aside)
    cold = {}
    for i, p in enumerate(prompts):
        engine.add_request(f"r{i}", p, SamplingParams(temperature=0.0, max_tokens=16))
        cold[i] = (await run_all(engine)).tokens[(f"r{i}", 0)]
    engine.add_request("again", prompts[0], SamplingParams(temperature=0.0, max_tokens=16))
    run = await run_all(engine)
    ex = engine.allocator.manager.executors[engine.allocator.executor_id]
    assert ex.pool.num_restores > 0 and ex.host_hit_tokens > 0
    assert run.outputs[-1].num_cached_tokens == (200 - 1) // 16 * 16
    assert run.tokens[("again", 0)] == cold[0]
