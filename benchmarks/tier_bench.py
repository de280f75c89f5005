"""The host-memory tier of the prefix cache (issue 26), tier on against tier off, in one run.

Model: the random-weight ~1B Llama of benchmarks/throughput.py (hidden 2048, 16 layers, 32
heads, 8 KV heads, intermediate 8192, vocab 32000; max_position_embeddings raised to fit the
longest conversation) in bf16, in-process allocator (kvmanager's own core), CUDA graphs. The
GPU pool is set (not profiled) to a quarter of the multi-turn workload's working set; the host
tier holds the whole working set (x1.25).

1. multi-turn, what the tier changes for a returning user: recomputing the history's prefill
   (off) against copying its KV back from host memory (on). C conversations x T turns; turn t
   re-sends the whole history (its prompts and replies) plus U new user tokens; conversation
   c's first prompt is P[c % len(P)] random tokens (--first-prompt 1024,2048,4096: one run
   gives the ratio against the history's length); replies are O tokens (EOS ignored). The
   default histories (6-9k tokens) are where the ratio can reach 3x for this model: a token
   of history costs ~2 GFLOP to recompute (~3.5 us on an H200) against 32 KiB to restore
   (~0.7 us at 45 GB/s), and the restored turn still pays its new tokens' prefill and the
   fixed costs of a step (~3-4 ms), so at 2k tokens of history the ratio is ~2x.
   Requests go turn by turn (every conversation's turn 1, then every turn 2, ...), K in flight
   (default 1, so a TTFT is the request's own: no other request's prefill in the same step),
   so a conversation returns after all the others have passed through the pool (4x its size):
   off, its history was evicted and is recomputed; on, it is restored from host memory. TTFT
   runs from submission to the first token, as a client sees it. Per arm: TTFT p50/p90 of
   returning turns (t >= 2) and of first turns (cold: the history's prefill at its first
   length), overall and by first-prompt length; engine steps from submission to the first
   token and the host time (schedule, launch) of the step that admitted a returning turn;
   output tokens/s; prefix hit rate in tokens by tier, spills and restores.
   A third arm, "resident" (a GPU pool holding the whole working set, no tier), is the
   ceiling: every history stays on the GPU. Its KV is the on arm's, computed once and never
   recomputed, so on and resident must give the same greedy replies token for token (the
   exactness check at this scale: the restored KV is the spilled KV, bit for bit). Off
   recomputes the history in a prefill, whose bf16 rounding differs from the decode steps that
   first wrote the replies' KV, and random weights have near-ties: its replies are compared by
   first token, on returning turns whose prompt is the same in both arms.
2. mixed (DESIGN.md's workload, offline): prompts uniform 128..1024, outputs 64..512, random
   ids: nothing is ever hit, but the pool evicts, so with the tier on every eviction spills.
   Output tokens/s on and off: the tier's cost where it never pays (target: under 2%). On an
   engine of its own, run V's (840-block pool, 4,160-block host tier, max_model_len 4,096;
   --mixed-gpu-blocks 0: on the multi-turn engine). --mixed-only runs just this part, the two
   arms' engines side by side and their runs interleaved (a warm-up each, then
   --mixed-repeats paired repeats): the medians' change and each pair's, steps and step time
   per arm.
3. H2D restore bandwidth: restoring R blocks through the tier (host_tier.py: one pinned copy a
   block into a staging buffer, one scatter into the pool) against the ceiling, one pinned
   copy of the same bytes; and the D2H spill path the same way.

kvmanager (in process) spills ahead of eviction with its defaults (--spill-ahead-watermark,
--spill-ahead-mib; mib 0: off). --mixed-ab: the mixed part as --mixed-only runs it, after the
multi-turn arms (one command for both); --no-ahead-arm adds a third mixed arm, the tier without
spill ahead, for the spill ahead's own effect. Counts: spills_ahead (of spills) and
evicted_ahead (evictions that found their copy made: no bytes moved).

Prints one JSON line (progress on stderr). --tiny: a CPU smoke run at toy sizes (checks the
script, not the figures).

    python benchmarks/tier_bench.py [--first-prompt 6144,8192] [--conversations 24]
        [--turns 4] [--concurrency 1] [--no-resident] [--dtype float32] [--tiny]
    python benchmarks/tier_bench.py --mixed-only [--mixed-repeats 5] [--no-ahead-arm]
    python benchmarks/tier_bench.py --no-resident --mixed-ab --no-ahead-arm --mixed-repeats 3
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import _repo  # noqa: F401  (first: the checkout's benchmarks/ and tests/ by name)
import torch
import transformers
from pagemesh.services.executor.config import EngineConfig
from pagemesh.services.executor.engine import LLMEngine
from pagemesh.services.executor.engine_api import SamplingParams
from pagemesh.services.executor.host_tier import TransferBatch
from pagemesh.services.executor.model.loader import load_model
from pagemesh.services.kvmanager.local import LocalAllocator
from pagemesh.services.kvmanager.manager import SPILL_AHEAD_MIB, SPILL_AHEAD_WATERMARK, Manager

from benchmarks.throughput import MODEL as THROUGHPUT_MODEL
from benchmarks.throughput import TINY_MODEL

# throughput.py's ~1B Llama, with room for a conversation's four turns (a copy: --tiny shrinks it).
MODEL = {**THROUGHPUT_MODEL, "max_position_embeddings": 4096}
BLOCK_SIZE = 16
DEVICE = "cuda"
# The mixed part's engine, as in run V (benchmarks/RESULTS.md), whose pool the multi-turn
# workload of then sized: since the multi-turn workload changed, the mixed part has its own.
MIXED_GPU_BLOCKS = 840
MIXED_HOST_BLOCKS = 4160
MIXED_MAX_MODEL_LEN = 4096


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def now() -> float:
    if DEVICE == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return 0.0
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))]


class Driver:
    """Runs requests through an engine with at most `k` in flight, timing each one's first
    token (from its submission: the queue wait is part of TTFT, as a client sees it)."""

    def __init__(self, engine: LLMEngine, k: int) -> None:
        self.engine = engine
        self.k = k
        self.n = 0

    async def run(self, jobs: list[tuple[str, list[int], int]]) -> dict[str, dict]:
        """`jobs`: (key, prompt, max_tokens) in submission order; the next is submitted when
        one finishes. Returns key -> {ttft, tokens, cached, steps (engine steps from the
        submission to the first token: 1 with synchronous steps, 2 with async scheduling at
        best), admit_schedule_ms / admit_launch_ms (the host time of the step that admitted it:
        exact when it was admitted alone)}."""
        engine = self.engine
        pending = list(reversed(jobs))
        live: dict[str, dict] = {}
        done: dict[str, dict] = {}
        rid_key: dict[str, str] = {}

        def submit() -> None:
            key, prompt, max_tokens = pending.pop()
            self.n += 1
            rid = f"q{self.n}"
            rid_key[rid] = key
            params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
            engine.add_request(rid, prompt, params)
            live[rid] = {
                "t0": time.perf_counter(),
                "step0": engine.num_steps,
                "ttft": None,
                "tokens": [],
                "cached": 0,
                "admit_schedule_ms": None,
                "admit_launch_ms": None,
            }

        while pending and len(live) < self.k:
            submit()
        while live:
            outputs = await engine.step()
            st = engine.step_times
            if st.num_admitted:  # (each request admitted by the step gets its host times)
                waiting = {q.request.request_id for q in engine.scheduler.waiting}
                for rid, r in live.items():
                    if r["admit_schedule_ms"] is None and rid not in waiting:
                        r["admit_schedule_ms"] = st.schedule * 1e3
                        r["admit_launch_ms"] = st.launch * 1e3
            for out in outputs:
                r = live.get(out.request_id)
                if r is None:
                    continue
                if out.token_ids and r["ttft"] is None:
                    r["ttft"] = time.perf_counter() - r["t0"]
                    r["steps"] = engine.num_steps - r["step0"]
                    r["cached"] = out.num_cached_tokens
                r["tokens"].extend(out.token_ids)
                if out.finished:
                    done[rid_key[out.request_id]] = live.pop(out.request_id)
                    if pending:
                        submit()
        return done


def tier_counts(engine: LLMEngine) -> dict:
    m = engine.allocator.manager
    ex = m.executors[engine.allocator.executor_id]
    q = m.stats.overall.total.query_tokens
    p = ex.pool
    return {
        "query_tokens": q,
        "gpu_hit_tokens": ex.gpu_hit_tokens,
        "host_hit_tokens": ex.host_hit_tokens,
        "gpu_hit_rate": round(ex.gpu_hit_tokens / q, 4) if q else 0.0,
        "host_hit_rate": round(ex.host_hit_tokens / q, 4) if q else 0.0,
        "spills": p.num_spills,
        "restores": p.num_restores,
        "host_drops": p.host_drops,
        "evictions": p.evictions,
        "spills_ahead": p.num_spills_ahead,
        "evicted_ahead": p.num_evicted_ahead,
    }


def ms(xs: list[float]) -> dict:
    """p50/p90 of seconds, in ms."""
    return {"p50": round(pct(xs, 0.5) * 1e3, 2), "p90": round(pct(xs, 0.9) * 1e3, 2)}


async def multi_turn(engine: LLMEngine, args, seed: int) -> tuple[dict, dict[str, dict]]:
    """The multi-turn workload on one engine; returns its summary and, per request (c{c}t{t}),
    {c, t, first_prompt, prompt (a hash of its ids: the same prompt in two arms), tokens,
    ttft, steps, cached, admit_*_ms}. The random ids come from `seed` alone, so every arm sends
    the same first prompts and user tokens; later prompts carry each arm's own replies."""
    rng = random.Random(seed)
    vocab = MODEL["vocab_size"]
    firsts = [args.first_prompt[c % len(args.first_prompt)] for c in range(args.conversations)]
    hist = [[rng.randrange(1, vocab) for _ in range(p)] for p in firsts]
    driver = Driver(engine, args.concurrency)
    recs: dict[str, dict] = {}
    tokens = 0
    before = tier_counts(engine)
    start = now()
    for t in range(args.turns):
        jobs = []
        for c in range(args.conversations):
            if t:
                hist[c] = hist[c] + [rng.randrange(1, vocab) for _ in range(args.user_tokens)]
            jobs.append((f"c{c}t{t}", hist[c], args.output_tokens))
        done = await driver.run(jobs)
        for c in range(args.conversations):
            key = f"c{c}t{t}"
            r = done[key]
            recs[key] = {
                **{k: r[k] for k in ("ttft", "steps", "cached", "tokens")},
                **{k: r[k] for k in ("admit_schedule_ms", "admit_launch_ms")},
                "c": c,
                "t": t,
                "first_prompt": firsts[c],
                "prompt": hash(tuple(hist[c])),
            }
            tokens += len(r["tokens"])
            hist[c] = hist[c] + r["tokens"]
    seconds = now() - start
    back = [r for r in recs.values() if r["t"]]
    first = [r for r in recs.values() if not r["t"]]
    by_first = {}
    for p in sorted(set(firsts)):
        rb = [r for r in back if r["first_prompt"] == p]
        by_first[str(p)] = {
            "ttft_returning_ms": ms([r["ttft"] for r in rb]),
            "ttft_first_turn_ms": ms([r["ttft"] for r in first if r["first_prompt"] == p]),
            "returning_cached_tokens_mean": round(statistics.fmean(r["cached"] for r in rb), 1)
            if rb
            else 0,
        }

    def median(key: str) -> float | None:
        xs = [r[key] for r in back if r[key] is not None]
        return round(statistics.median(xs), 3) if xs else None

    steps = [r["steps"] for r in back]
    return {
        "requests": len(recs),
        "output_tokens": tokens,
        "seconds": round(seconds, 3),
        "output_tok_s": round(tokens / seconds, 1),
        "ttft_returning_ms": ms([r["ttft"] for r in back]),
        "ttft_first_turn_ms": ms([r["ttft"] for r in first]),
        "by_first_prompt": by_first,
        "returning_cached_tokens_mean": round(statistics.fmean(r["cached"] for r in back), 1)
        if back
        else 0,
        # Under async scheduling (CUDA) 2 is the least: the admitting step, then the step
        # launched before it lands. A restore must not add one.
        "returning_steps_to_first_token": {"p50": pct(steps, 0.5), "max": max(steps, default=0)},
        "returning_admit_step_host_ms": {
            "schedule_p50": median("admit_schedule_ms"),
            "launch_p50": median("admit_launch_ms"),
        },
        **tier_delta(before, tier_counts(engine)),
    }, recs


def agreement(arms: dict[str, dict[str, dict]]) -> dict:
    """How the arms' greedy outputs compare (module docstring, 1.)."""
    out: dict = {}
    keys = sorted(next(iter(arms.values())))
    first_turns = [k for k in keys if not next(iter(arms.values()))[k]["t"]]
    out["first_turn_replies_equal"] = (
        f"{sum(len({tuple(a[k]['tokens']) for a in arms.values()}) == 1 for k in first_turns)}"
        f"/{len(first_turns)}"
    )
    if "on" in arms and "resident" in arms:
        on, res = arms["on"], arms["resident"]
        out["on_vs_resident_replies_equal"] = (
            f"{sum(on[k]['tokens'] == res[k]['tokens'] for k in keys)}/{len(keys)}"
        )
    if "on" in arms and "off" in arms:
        on, off = arms["on"], arms["off"]
        out["off_vs_on_replies_equal"] = (
            f"{sum(on[k]['tokens'] == off[k]['tokens'] for k in keys)}/{len(keys)}"
        )
        same = [k for k in keys if on[k]["t"] and on[k]["prompt"] == off[k]["prompt"]]
        out["off_vs_on_first_token_equal_same_prompt"] = (
            f"{sum(on[k]['tokens'][:1] == off[k]['tokens'][:1] for k in same)}/{len(same)}"
        )
    return out


def tier_delta(before: dict, after: dict) -> dict:
    """The counts of one workload (the warm-up's and earlier ones' taken off), rates on them."""
    d = {k: after[k] - before[k] for k in after if not k.endswith("_rate")}
    q = d["query_tokens"]
    d["gpu_hit_rate"] = round(d["gpu_hit_tokens"] / q, 4) if q else 0.0
    d["host_hit_rate"] = round(d["host_hit_tokens"] / q, 4) if q else 0.0
    return d


async def mixed(engine: LLMEngine, args, seed: int) -> dict:
    rng = random.Random(seed)
    jobs = []
    for i in range(args.mixed_requests):
        p = rng.randint(args.mixed_prompt[0], args.mixed_prompt[1])
        o = rng.randint(args.mixed_output[0], args.mixed_output[1])
        jobs.append((f"m{i}", [rng.randrange(1, MODEL["vocab_size"]) for _ in range(p)], o))
    before = tier_counts(engine)
    steps = engine.num_steps
    start = now()
    done = await Driver(engine, len(jobs)).run(jobs)  # offline: all at t=0
    seconds = now() - start
    steps = engine.num_steps - steps
    tokens = sum(len(r["tokens"]) for r in done.values())
    after = tier_counts(engine)
    return {
        "requests": len(jobs),
        "output_tokens": tokens,
        "seconds": round(seconds, 3),
        "output_tok_s": round(tokens / seconds, 1),
        "steps": steps,
        "step_ms": round(seconds / steps * 1e3, 3) if steps else 0.0,
        "hit_tokens": after["gpu_hit_tokens"]
        + after["host_hit_tokens"]
        - before["gpu_hit_tokens"]
        - before["host_hit_tokens"],
        "spills": after["spills"] - before["spills"],
        "evictions": after["evictions"] - before["evictions"],
        "spills_ahead": after["spills_ahead"] - before["spills_ahead"],
        "evicted_ahead": after["evicted_ahead"] - before["evicted_ahead"],
    }


async def mixed_ab(engines: dict[str, LLMEngine], args) -> dict:
    """The mixed workload only, tier off and on interleaved: a warm-up run each (the host tier
    fills, as after the multi-turn part), then R repeats, each a fresh seed run by both arms
    in alternating order, so drift (clocks, heat, other tenants) falls on both alike. Reports
    each arm's runs and the change of the medians (target: within -2%)."""
    runs: dict[str, list[dict]] = {arm: [] for arm in engines}
    for arm, engine in engines.items():
        log(f"mixed warm-up, tier {arm}")
        await mixed(engine, args, args.seed + 1000)
    order = list(engines)
    for r in range(args.mixed_repeats):
        # (rotated: each arm runs first, in the middle and last alike over the repeats)
        for arm in order[r % len(order) :] + order[: r % len(order)]:
            runs[arm].append(await mixed(engines[arm], args, args.seed + 1 + r))
            log(f"mixed repeat {r} tier {arm}: {runs[arm][-1]['output_tok_s']} tok/s")
    out: dict = {}
    for arm, xs in runs.items():
        rates = [x["output_tok_s"] for x in xs]
        out[arm] = {
            "output_tok_s_median": statistics.median(rates),
            "output_tok_s_runs": rates,
            "steps": [x["steps"] for x in xs],
            "step_ms_median": round(statistics.median(x["step_ms"] for x in xs), 3),
            "spills": sum(x["spills"] for x in xs),
            "evictions": sum(x["evictions"] for x in xs),
            "spills_ahead": sum(x["spills_ahead"] for x in xs),
            "evicted_ahead": sum(x["evicted_ahead"] for x in xs),
        }
    off = out["off"]["output_tok_s_median"]
    for arm in [a for a in runs if a != "off"]:
        on = out[arm]["output_tok_s_median"]
        key = "" if arm == "on" else f"_{arm}"
        out[f"change_pct_of_medians{key}"] = round((on - off) / off * 100, 2) if off else None
        # Paired: each repeat's arms ran back to back on the same requests.
        pairs = [
            (b["output_tok_s"] - a["output_tok_s"]) / a["output_tok_s"] * 100
            for a, b in zip(runs["off"], runs[arm], strict=True)
        ]
        out[f"change_pct_paired{key}"] = [round(p, 2) for p in pairs]
    return out


def transfer_bandwidth(engine: LLMEngine, n: int) -> dict:
    """The tier's own restore and spill paths on n blocks, against one pinned copy of the same
    bytes each way (the ceiling). Run last: it overwrites pool blocks."""
    tier = engine.runner.host_tier
    assert tier is not None
    n = min(n, tier.num_blocks, engine.pool.num_blocks)
    nbytes = n * tier.block_bytes
    pairs = list(zip(range(n), range(n), strict=True))

    def timed(fn) -> float:
        fn()  # warm-up
        if DEVICE == "cuda":
            tier.synchronize()
            torch.cuda.synchronize()
        best = float("inf")
        for _ in range(5):
            t0 = now()
            fn()
            if DEVICE == "cuda":
                tier.synchronize()
            best = min(best, now() - t0)
        return best

    restore = timed(lambda: tier.run([TransferBatch(restores=pairs)]))
    spill = timed(lambda: tier.run([TransferBatch(spills=pairs)]))
    pin = DEVICE == "cuda"
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pin)
    dev = torch.empty(nbytes, dtype=torch.uint8, device=DEVICE)
    h2d = timed(lambda: dev.copy_(host, non_blocking=True))
    d2h = timed(lambda: host.copy_(dev, non_blocking=True))
    gbs = lambda s: round(nbytes / s / 1e9, 2)  # noqa: E731
    return {
        "blocks": n,
        "block_bytes": tier.block_bytes,
        "restore_gb_s": gbs(restore),
        "h2d_pinned_ceiling_gb_s": gbs(h2d),
        "restore_of_ceiling": round(h2d / restore, 3),
        "spill_gb_s": gbs(spill),
        "d2h_pinned_ceiling_gb_s": gbs(d2h),
        "spill_of_ceiling": round(d2h / spill, 3),
    }


def copy_queueing(engine: LLMEngine, nbytes: int) -> dict:
    """Does a step's small copy (its inputs up, its sampled tokens down, on the compute stream)
    wait behind a large tier copy in the same direction on the side stream (one copy engine a
    direction), or run beside it? A 1 KiB copy's latency alone and issued right after a copy of
    `nbytes` (a returning history's restores, or the spills of the blocks they evict), with
    that copy's own time. CUDA only."""
    assert engine.runner.host_tier is not None and DEVICE == "cuda"
    side = torch.cuda.Stream()
    big_host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    big_dev = torch.empty(nbytes, dtype=torch.uint8, device=DEVICE)
    small_host = torch.empty(1024, dtype=torch.uint8, pin_memory=True)
    small_dev = torch.empty(1024, dtype=torch.uint8, device=DEVICE)

    def small(direction: str, behind: bool) -> float:
        """The median of 7 (not the best: a copy that sometimes waits must show)."""
        times = []
        for _ in range(7):
            torch.cuda.synchronize()
            if behind:
                with torch.cuda.stream(side):
                    if direction == "d2h":
                        big_host.copy_(big_dev, non_blocking=True)
                    else:
                        big_dev.copy_(big_host, non_blocking=True)
            t0 = time.perf_counter()
            if direction == "d2h":
                small_host.copy_(small_dev, non_blocking=True)
            else:
                small_dev.copy_(small_host, non_blocking=True)
            torch.cuda.current_stream().synchronize()
            times.append(time.perf_counter() - t0)
            side.synchronize()
        return round(statistics.median(times) * 1e6, 1)

    big_host.copy_(big_dev, non_blocking=True)  # warm-up
    t0 = now()
    big_host.copy_(big_dev, non_blocking=True)
    big_ms = round((now() - t0) * 1e3, 3)
    return {
        "big_copy_mb": round(nbytes / 1e6, 1),
        "big_d2h_ms": big_ms,
        "small_d2h_alone_us": small("d2h", False),
        "small_d2h_behind_big_us": small("d2h", True),
        "small_h2d_alone_us": small("h2d", False),
        "small_h2d_behind_big_us": small("h2d", True),
    }


async def make_engine(
    path: Path,
    model,
    mconf,
    dtype,
    args,
    host_blocks: int,
    gpu_blocks: int | None = None,
    max_model_len: int | None = None,
    no_ahead: bool = False,
) -> LLMEngine:
    config = EngineConfig(
        model=str(path),
        device=DEVICE,
        dtype=str(dtype).removeprefix("torch."),
        block_size=BLOCK_SIZE,
        num_blocks=gpu_blocks or args.gpu_blocks,
        max_model_len=max_model_len,
        host_kv_blocks=host_blocks,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        use_cuda_graphs=DEVICE == "cuda",
        async_scheduling=True,  # (the CUDA default; on CPU too, so --tiny counts steps alike)
    )
    ahead = (args.spill_ahead_watermark, 0.0 if no_ahead else args.spill_ahead_mib)
    allocator = LocalAllocator(
        manager=Manager(spill_ahead_watermark=ahead[0], spill_ahead_mib=ahead[1])
    )
    engine = LLMEngine(config, allocator, model=model, model_config=mconf)
    await engine.start()
    return engine


async def mixed_ab_engines(
    tmp: Path, model, mconf, dtype, args, host_blocks: int, sizes: tuple
) -> dict:
    """The mixed part's A/B (mixed_ab) on engines of its own, side by side: tier off, on, and
    with --no-ahead-arm on without spill ahead."""
    plan = [("off", 0, False), ("on", host_blocks, False)]
    if args.no_ahead_arm:
        plan.append(("on_noahead", host_blocks, True))
    engines = {
        arm: await make_engine(tmp, model, mconf, dtype, args, host, *sizes, no_ahead=no_ahead)
        for arm, host, no_ahead in plan
    }
    out = await mixed_ab(engines, args)
    for engine in engines.values():
        await engine.close()
        release(engine)
    return out


def release(engine: LLMEngine) -> None:
    del engine
    gc.collect()
    if DEVICE == "cuda":
        torch.cuda.empty_cache()


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--conversations", type=int, default=24)
    ap.add_argument("--turns", type=int, default=4)
    ap.add_argument(
        "--first-prompt",
        default="6144,8192",
        help="first prompt lengths, comma-separated: conversation c gets the (c mod n)-th",
    )
    ap.add_argument("--user-tokens", type=int, default=128)
    ap.add_argument("--output-tokens", type=int, default=32)
    ap.add_argument("--concurrency", type=int, default=1, help="multi-turn requests in flight")
    ap.add_argument("--pool-fraction", type=float, default=0.25, help="GPU pool / working set")
    ap.add_argument(
        "--no-resident", action="store_true", help="skip the resident arm (GPU pool = all)"
    )
    ap.add_argument("--dtype", choices=("bfloat16", "float32"), help="default: bf16 on CUDA")
    ap.add_argument("--mixed-requests", type=int, default=128)
    ap.add_argument(
        "--mixed-only",
        action="store_true",
        help="only the mixed workload, tier off and on interleaved (--mixed-repeats)",
    )
    ap.add_argument("--mixed-repeats", type=int, default=5)
    ap.add_argument(
        "--mixed-gpu-blocks",
        type=int,
        default=MIXED_GPU_BLOCKS,
        help="the mixed part's GPU pool, on an engine of its own (0: the multi-turn engine's)",
    )
    ap.add_argument(
        "--mixed-ab",
        action="store_true",
        help="after the multi-turn arms, the mixed part as --mixed-only runs it (interleaved"
        " repeats on engines of their own) instead of one run an arm",
    )
    ap.add_argument(
        "--spill-ahead-watermark",
        type=float,
        default=SPILL_AHEAD_WATERMARK,
        help="kvmanager's spill ahead of eviction: fraction of the pool kept free or copied",
    )
    ap.add_argument(
        "--spill-ahead-mib",
        type=float,
        default=SPILL_AHEAD_MIB,
        help="kvmanager's spill ahead: MiB a Step call (0: off, spills only on eviction)",
    )
    ap.add_argument(
        "--no-ahead-arm",
        action="store_true",
        help="the mixed A/B (--mixed-only, --mixed-ab) also runs the tier with spill ahead off"
        " (arm on_noahead): the spill ahead's own effect",
    )
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--max-num-batched-tokens", type=int, default=8192)
    ap.add_argument("--bandwidth-blocks", type=int, default=1024)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tiny", action="store_true", help="CPU smoke run at toy sizes")
    args = ap.parse_args()
    global DEVICE
    args.first_prompt = [int(x) for x in str(args.first_prompt).split(",")]
    args.mixed_prompt, args.mixed_output = (128, 1024), (64, 512)
    if args.tiny:
        DEVICE = "cpu"
        MODEL.update(TINY_MODEL, vocab_size=512)
        args.conversations, args.turns, args.first_prompt = 6, 3, [64, 96]
        args.user_tokens, args.output_tokens, args.concurrency = 16, 8, 1
        args.mixed_requests, args.mixed_prompt, args.mixed_output = 8, (32, 96), (8, 16)
        args.mixed_repeats = min(args.mixed_repeats, 2)
        args.max_num_seqs, args.max_num_batched_tokens = 16, 512
        args.bandwidth_blocks, args.mixed_gpu_blocks = 16, 0
    # Working set: every conversation's history at its last turn, in blocks.
    per_conv = [
        -(
            -(p + (args.turns - 1) * (args.user_tokens + args.output_tokens) + args.output_tokens)
            // BLOCK_SIZE
        )
        for p in (args.first_prompt[c % len(args.first_prompt)] for c in range(args.conversations))
    ]
    working_set = sum(per_conv)
    longest = max(per_conv)
    args.gpu_blocks = max(int(working_set * args.pool_fraction), longest * args.concurrency + 8)
    host_blocks = int(working_set * 1.25)
    resident_blocks = working_set + longest * args.concurrency + 64
    # Room for the longest conversation (the mixed workload's prompts are shorter).
    MODEL["max_position_embeddings"] = max(
        MODEL["max_position_embeddings"], -(-(longest * BLOCK_SIZE + 64) // 1024) * 1024
    )

    result: dict = {
        "bench": "tier",
        "device": torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu",
        "torch": torch.__version__,
        "block_size": BLOCK_SIZE,
        "working_set_blocks": working_set,
        "gpu_blocks": args.gpu_blocks,
        "host_blocks": host_blocks,
        "resident_blocks": 0 if args.no_resident else resident_blocks,
        "max_model_len": MODEL["max_position_embeddings"],
        "workload": {
            "conversations": args.conversations,
            "turns": args.turns,
            "first_prompt": args.first_prompt,
            "user_tokens": args.user_tokens,
            "output_tokens": args.output_tokens,
            "concurrency": args.concurrency,
            "mixed_requests": args.mixed_requests,
        },
    }
    torch.manual_seed(args.seed)
    cfg = transformers.LlamaConfig(**MODEL, eos_token_id=None, bos_token_id=None, pad_token_id=0)
    if args.dtype:
        dtype = getattr(torch, args.dtype)
    else:
        dtype = torch.bfloat16 if DEVICE == "cuda" else torch.float32
    result["dtype"] = str(dtype).removeprefix("torch.")
    with torch.device(DEVICE):
        hf = transformers.LlamaForCausalLM(cfg).to(dtype).eval()
    tmp = Path(tempfile.mkdtemp(prefix="pm-tier-"))
    hf.save_pretrained(tmp)
    result["params_b"] = round(sum(p.numel() for p in hf.parameters()) / 1e9, 3)
    del hf
    model, mconf = load_model(tmp, DEVICE, dtype)
    log(f"model {result['params_b']}B; pool {args.gpu_blocks} blocks, host {host_blocks}")

    if args.mixed_only:
        # Run V's mixed engine (module docstring, 2.), or the multi-turn one's sizes.
        own = bool(args.mixed_gpu_blocks)
        sizes = (args.mixed_gpu_blocks, MIXED_MAX_MODEL_LEN) if own else (None, None)
        result["mixed_ab"] = await mixed_ab_engines(
            tmp, model, mconf, dtype, args, MIXED_HOST_BLOCKS if own else host_blocks, sizes
        )
        print(json.dumps(result))
        return

    arms: dict[str, dict] = {}
    recs: dict[str, dict[str, dict]] = {}
    plan = [("off", 0, args.gpu_blocks), ("on", host_blocks, args.gpu_blocks)]
    if not args.no_resident:
        plan.append(("resident", 0, resident_blocks))
    for arm, host, blocks in plan:
        engine = await make_engine(tmp, model, mconf, dtype, args, host, blocks)
        # Warm-up (graphs, Triton, allocator caches) on a salt of its own: prompts of each
        # first length, so the prefill kernels have met every context length range.
        await Driver(engine, 2).run(
            [(f"w{i}", [7 + i] * p, 4) for i, p in enumerate(args.first_prompt)]
        )
        log(f"tier {arm}: multi-turn")
        mt, recs[arm] = await multi_turn(engine, args, args.seed)
        arms[arm] = {"multi_turn": mt}
        if arm != "resident" and not args.mixed_gpu_blocks and not args.mixed_ab:
            log(f"tier {arm}: mixed")
            arms[arm]["mixed"] = await mixed(engine, args, args.seed + 1)
        if host:
            log("transfer bandwidth")
            result["transfer"] = transfer_bandwidth(engine, args.bandwidth_blocks)
            if DEVICE == "cuda":
                block_bytes = result["transfer"]["block_bytes"]
                result["copy_queueing"] = copy_queueing(engine, longest * block_bytes)
        await engine.close()
        release(engine)
        if arm != "resident" and args.mixed_gpu_blocks and not args.mixed_ab:
            # The mixed part on an engine of its own, as run V ran it (module docstring, 2.).
            engine = await make_engine(
                tmp,
                model,
                mconf,
                dtype,
                args,
                MIXED_HOST_BLOCKS if host else 0,
                args.mixed_gpu_blocks,
                MIXED_MAX_MODEL_LEN,
            )
            await Driver(engine, 4).run([(f"w{i}", [7 + i] * 512, 4) for i in range(4)])
            log(f"tier {arm}: mixed")
            arms[arm]["mixed"] = await mixed(engine, args, args.seed + 1)
            await engine.close()
            release(engine)
    result["arms"] = arms
    result["agreement"] = agreement(recs)
    off, on = arms["off"]["multi_turn"], arms["on"]["multi_turn"]

    def ratio(a: float, b: float) -> float | None:
        return round(a / b, 2) if b else None

    result["ttft_returning_p50_speedup"] = ratio(
        off["ttft_returning_ms"]["p50"], on["ttft_returning_ms"]["p50"]
    )
    result["ttft_returning_p50_speedup_by_first_prompt"] = {
        p: ratio(
            off["by_first_prompt"][p]["ttft_returning_ms"]["p50"],
            on["by_first_prompt"][p]["ttft_returning_ms"]["p50"],
        )
        for p in on["by_first_prompt"]
    }
    if "resident" in arms:
        # What the restores cost over a GPU hit (1.0: nothing).
        res = arms["resident"]["multi_turn"]
        result["ttft_returning_p50_on_over_resident"] = ratio(
            on["ttft_returning_ms"]["p50"], res["ttft_returning_ms"]["p50"]
        )
    if args.mixed_ab:
        own = bool(args.mixed_gpu_blocks)
        sizes = (args.mixed_gpu_blocks, MIXED_MAX_MODEL_LEN) if own else (None, None)
        result["mixed_ab"] = await mixed_ab_engines(
            tmp, model, mconf, dtype, args, MIXED_HOST_BLOCKS if own else host_blocks, sizes
        )
    else:
        moff, mon = arms["off"]["mixed"]["output_tok_s"], arms["on"]["mixed"]["output_tok_s"]
        result["mixed_tok_s_change_pct"] = round((mon - moff) / moff * 100, 2) if moff else None
    print(json.dumps(result))


if __name__ == "__main__":
    asyncio.run(main())
