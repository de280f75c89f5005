"""The host tier's admission host time, on the CPU (issue 26: a restored 8k-token turn's
admitting step spent 3.4 + 3.4 ms of host time on the GPU against 1.2 + 1.4 without the tier).

Times, in process, kvmanager's core (Manager.allocate, as the in-process allocator runs it on the
executor's critical path) for one prompt of `--blocks` full blocks (+1 token) whose blocks are
  gpu      all cached in the GPU pool (prefix hits, no transfer)
  restore  all in the host tier (every block restored into a fresh GPU block)
  spill    a cold prompt whose allocation evicts as many cached GPU blocks into the host tier
and the executor's launch-side work for the restore and spill cases (host_tier.HostTier.run on
CPU tensors), split into
  plan     the transfer batch: merge, host-order sort, runs, the index array
  copies   the copies themselves (CPU memory; on CUDA these are queued, not waited for)
Each case is timed `--repeats` times in a loop that recreates its state off the clock (the pool
is the prompt's size plus a few blocks, so the spill case evicts the whole cached prompt); medians,
in microseconds per call and per block. Prints one JSON line.

    python benchmarks/tier_admit_bench.py [--blocks 512] [--repeats 50] [--events] [--spill-ahead]
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import time
from types import SimpleNamespace
from typing import cast

import _repo  # noqa: F401
import torch
from pagemesh.services.executor.host_tier import HostTier, TransferBatch
from pagemesh.services.executor.kv_pool import KVPool
from pagemesh.services.executor.model.config import ModelConfig
from pagemesh.services.kvmanager.manager import Manager

BS = 16
EID = "bench"


def _commit_all(m: Manager, epoch: int, seq_id: str, tokens: list[int]) -> None:
    full = len(tokens) // BS
    m.commit(EID, epoch, [(seq_id, i, tokens[i * BS : (i + 1) * BS]) for i in range(full)])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--blocks", type=int, default=512, help="full blocks of the prompt")
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--events", action="store_true", help="track change events (gRPC server)")
    ap.add_argument("--layers", type=int, default=4, help="KV layers of a block (copies)")
    ap.add_argument(
        "--spill-ahead",
        action="store_true",
        help="(d): Step calls' spills ahead of eviction first (watermark 1.0, 32 MiB a call,"
        " off the clock), as between a conversation's turns: its evictions move no bytes",
    )
    args = ap.parse_args()
    n = args.blocks
    m = Manager(track_changes=args.events, spill_ahead_watermark=0.0)
    num_blocks = n + 16
    # (block bytes: a spill-ahead budget of 32 MiB is ~680 of the bench's 48 KiB blocks)
    epoch = m.register(EID, num_blocks, BS, "fp", num_host_blocks=8 * n, kv_block_bytes=49152)
    p_tokens = [1000 + i for i in range(n * BS + 1)]  # the returning history
    m_off = Manager(track_changes=args.events)  # the same pool without a host tier
    epoch_off = m_off.register(EID, num_blocks, BS, "fp")

    mc = cast(ModelConfig, SimpleNamespace(num_layers=args.layers, num_kv_heads=3, head_dim=64))
    kv = KVPool(mc, num_blocks, BS, torch.bfloat16, torch.device("cpu"))
    tier = HostTier(kv, 8 * n, torch.device("cpu"))
    tier.blocks.zero_()  # (first touch off the clock)

    t_gpu: list[float] = []
    t_restore: list[float] = []
    t_spill: list[float] = []
    t_both: list[float] = []
    t_off: list[float] = []
    plan_both: list[float] = []
    copy_both: list[float] = []
    plan_restore: list[float] = []
    plan_spill: list[float] = []
    copy_restore: list[float] = []
    copy_spill: list[float] = []
    counts = {"spills": 0, "restores": 0, "both": 0}

    def launch(a_spills: list, a_restores: list, plan: list[float], copies: list[float]) -> None:
        batches = [TransferBatch(list(a_spills), list(a_restores))]
        t0 = time.perf_counter()
        tier.plan(batches)
        t1 = time.perf_counter()
        tier.run([TransferBatch(list(a_spills), list(a_restores))])
        t2 = time.perf_counter()
        plan.append(t1 - t0)
        copies.append((t2 - t1) - (t1 - t0))  # run = plan + copies

    # The executor freezes its start-up heap (pagemesh.heap): the collector's passes then skip
    # torch's objects, as here.
    gc.collect()
    gc.freeze()
    # P allocated, written and released: its blocks are cached on the GPU.
    m.allocate(EID, epoch, "p", p_tokens)
    _commit_all(m, epoch, "p", p_tokens)
    m.release(EID, epoch, ["p"])
    pool = m.executors[EID].pool
    for r in range(args.repeats + 3):
        cold = [(r + 1) * 10_000_000 + i for i in range(n * BS + 1)]  # never seen before
        filler = [(r + 1) * 10_000_000 + 5_000_000 + i for i in range(n * BS + 1)]
        # (a) every block a GPU hit
        t0 = time.perf_counter()
        a = m.allocate(EID, epoch, "p", p_tokens)
        t1 = time.perf_counter()
        assert a.num_cached_tokens == n * BS and not a.spills and not a.restores
        m.release(EID, epoch, ["p"])
        # (c) a cold prompt evicts P's cached blocks into the host tier
        t2 = time.perf_counter()
        a = m.allocate(EID, epoch, "c", cold)
        t3 = time.perf_counter()
        assert a.num_cached_tokens == 0 and len(a.spills) >= n - 16, len(a.spills)
        launch(a.spills, a.restores, plan_spill, copy_spill)
        counts["spills"] = len(a.spills)
        m.release(EID, epoch, ["c"])  # never committed: its blocks go back free
        # (b) P again: every block restored from the host tier into a free GPU block
        t4 = time.perf_counter()
        a = m.allocate(EID, epoch, "p", p_tokens)
        t5 = time.perf_counter()
        assert len(a.restores) >= n - 16 and not a.spills, (len(a.restores), len(a.spills))
        launch(a.spills, a.restores, plan_restore, copy_restore)
        counts["restores"] = len(a.restores)
        m.release(EID, epoch, ["p"])
        # (d) the returning turn of a full pool (run X's case): a filler prompt, written and
        # released, has evicted P to the host tier; P's allocation restores it while evicting
        # the filler's cached blocks into the host tier. (e) the off arm's same step: without
        # a tier, P is cold and its allocation evicts the filler's blocks, nothing copied.
        for mm, ep in ((m, epoch), (m_off, epoch_off)):
            mm.allocate(EID, ep, "f", filler)
            _commit_all(mm, ep, "f", filler)
            mm.release(EID, ep, ["f"])
        m.take_spills(EID)  # (the filler's spills: off the clock)
        ahead = 0
        if args.spill_ahead:
            m.spill_ahead_watermark = 1.0
            while batch := m.spill_ahead(EID):
                ahead += len(batch)
            m.spill_ahead_watermark = 0.0  # (none elsewhere)
        t6 = time.perf_counter()
        a = m.allocate(EID, epoch, "p", p_tokens)
        t7 = time.perf_counter()
        assert len(a.restores) >= n - 16, len(a.restores)
        assert len(a.spills) >= n - 32 if not args.spill_ahead else not a.spills, len(a.spills)
        launch(a.spills, a.restores, plan_both, copy_both)
        counts["both"] = len(a.restores) + len(a.spills)
        counts["both_spills"] = len(a.spills)
        counts["spilled_ahead_before_both"] = ahead
        m.release(EID, epoch, ["p"])
        t8 = time.perf_counter()
        a = m_off.allocate(EID, epoch_off, "p", p_tokens)
        t9 = time.perf_counter()
        assert a.num_cached_tokens == 0
        m_off.release(EID, epoch_off, ["p"])  # never committed: P stays cold there
        if r >= 3:  # warm-up rounds off the record
            t_gpu.append(t1 - t0)
            t_spill.append(t3 - t2)
            t_restore.append(t5 - t4)
            t_both.append(t7 - t6)
            t_off.append(t9 - t8)
    pool.check()

    def us(xs: list[float]) -> float:
        return round(statistics.median(xs) * 1e6, 1)

    def per_block(xs: list[float], k: int) -> float:
        return round(statistics.median(xs) * 1e6 / k, 3)

    print(
        json.dumps(
            {
                "bench": "tier_admit",
                "blocks": n,
                "events": args.events,
                "spill_ahead": args.spill_ahead,
                "repeats": args.repeats,
                "python": platform.python_version(),
                "allocate_us": {
                    "gpu": us(t_gpu),
                    "restore": us(t_restore),
                    "spill": us(t_spill),
                    "restore_and_spill": us(t_both),
                    "no_tier_evict": us(t_off),
                },
                "allocate_us_per_block": {
                    "gpu": per_block(t_gpu, n),
                    "restore": per_block(t_restore, counts["restores"]),
                    "spill": per_block(t_spill, counts["spills"]),
                    "restore_and_spill": per_block(t_both, n),
                    "no_tier_evict": per_block(t_off, n),
                },
                "launch_plan_us": {
                    "restore": us(plan_restore),
                    "spill": us(plan_spill),
                    "restore_and_spill": us(plan_both),
                },
                "launch_copies_us": {
                    "restore": us(copy_restore),
                    "spill": us(copy_spill),
                    "restore_and_spill": us(copy_both),
                },
                "block_bytes": tier.block_bytes,
                "transfers": counts,
            }
        )
    )


if __name__ == "__main__":
    main()
