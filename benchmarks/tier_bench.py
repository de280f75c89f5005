"""The host-memory tier of the prefix cache (issue 26), tier on against tier off, in one run.

Model: the random-weight ~1B Llama of benchmarks/throughput.py (hidden 2048, 16 layers, 32
heads, 8 KV heads, intermediate 8192, vocab 32000) in bf16, in-process allocator (kvmanager's
own core), CUDA graphs. The GPU pool is set (not profiled) to a quarter of the multi-turn
workload's working set; the host tier holds the whole working set (x1.25).

1. multi-turn: C conversations x T turns; turn t re-sends the whole history (its prompt and
   reply) plus U new user tokens; the first turn's prompt is P random tokens; replies are O
   tokens (EOS ignored). Requests go out in waves (every conversation's turn 1, then every
   turn 2, ...) with K in flight at once, so a conversation returns after all the others have
   passed through the pool (4x its size): off, its history was evicted and is recomputed; on,
   it comes back from host memory. Per arm: TTFT p50/p90 of the returning turns (t >= 2) and of
   first turns, output tokens/s, prefix hit rate in tokens by tier, spills and restores, and
   whether the two arms' greedy replies are the same tokens.
2. mixed (DESIGN.md's workload, offline): prompts uniform 128..1024, outputs 64..512, random
   ids: nothing is ever hit, but the pool evicts, so with the tier on every eviction spills.
   Output tokens/s on and off: the tier's cost where it never pays (target: under 2%).
   --mixed-only runs just this part, the two arms' engines side by side and their runs
   interleaved (a warm-up each, then --mixed-repeats paired repeats): the medians' change and
   each pair's, steps and step time per arm (the pool is sized by --conversations as above).
3. H2D restore bandwidth: restoring R blocks through the tier (host_tier.py: one pinned copy a
   block into a staging buffer, one scatter into the pool) against the ceiling, one pinned
   copy of the same bytes; and the D2H spill path the same way.

Prints one JSON line (progress on stderr). --tiny: a CPU smoke run at toy sizes (checks the
script, not the figures).

    python benchmarks/tier_bench.py [--conversations 64] [--turns 4] [--tiny]
    python benchmarks/tier_bench.py --conversations 32 --mixed-only [--mixed-repeats 5]
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

from benchmarks.throughput import MODEL as THROUGHPUT_MODEL
from benchmarks.throughput import TINY_MODEL

# throughput.py's ~1B Llama, with room for a conversation's four turns (a copy: --tiny shrinks it).
MODEL = {**THROUGHPUT_MODEL, "max_position_embeddings": 4096}
BLOCK_SIZE = 16
DEVICE = "cuda"


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
        one finishes. Returns key -> {ttft, tokens, cached}."""
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
            live[rid] = {"t0": time.perf_counter(), "ttft": None, "tokens": [], "cached": 0}

        while pending and len(live) < self.k:
            submit()
        while live:
            for out in await engine.step():
                r = live.get(out.request_id)
                if r is None:
                    continue
                if out.token_ids and r["ttft"] is None:
                    r["ttft"] = time.perf_counter() - r["t0"]
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
    }


async def multi_turn(engine: LLMEngine, args, seed: int) -> tuple[dict, dict[str, list[int]]]:
    rng = random.Random(seed)
    hist = [
        [rng.randrange(1, MODEL["vocab_size"]) for _ in range(args.first_prompt)]
        for _ in range(args.conversations)
    ]
    driver = Driver(engine, args.concurrency)
    ttft_first: list[float] = []
    ttft_back: list[float] = []
    cached_back: list[int] = []
    replies: dict[str, list[int]] = {}
    tokens = 0
    before = tier_counts(engine)
    start = now()
    for t in range(args.turns):
        jobs = []
        for c in range(args.conversations):
            if t:
                hist[c] = hist[c] + [
                    rng.randrange(1, MODEL["vocab_size"]) for _ in range(args.user_tokens)
                ]
            jobs.append((f"c{c}t{t}", hist[c], args.output_tokens))
        done = await driver.run(jobs)
        for c in range(args.conversations):
            r = done[f"c{c}t{t}"]
            replies[f"c{c}t{t}"] = r["tokens"]
            tokens += len(r["tokens"])
            hist[c] = hist[c] + r["tokens"]
            if t:
                ttft_back.append(r["ttft"])
                cached_back.append(r["cached"])
            else:
                ttft_first.append(r["ttft"])
    seconds = now() - start
    return {
        "requests": args.conversations * args.turns,
        "output_tokens": tokens,
        "seconds": round(seconds, 3),
        "output_tok_s": round(tokens / seconds, 1),
        "ttft_returning_ms": {
            "p50": round(pct(ttft_back, 0.5) * 1e3, 2),
            "p90": round(pct(ttft_back, 0.9) * 1e3, 2),
        },
        "ttft_first_turn_ms": {
            "p50": round(pct(ttft_first, 0.5) * 1e3, 2),
            "p90": round(pct(ttft_first, 0.9) * 1e3, 2),
        },
        "returning_cached_tokens_mean": round(statistics.fmean(cached_back), 1)
        if cached_back
        else 0,
        **tier_delta(before, tier_counts(engine)),
    }, replies


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
        for arm in order if r % 2 == 0 else reversed(order):
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
        }
    off, on = out["off"]["output_tok_s_median"], out["on"]["output_tok_s_median"]
    out["change_pct_of_medians"] = round((on - off) / off * 100, 2) if off else None
    # Paired: each repeat's two arms ran back to back on the same requests.
    pairs = [
        (b["output_tok_s"] - a["output_tok_s"]) / a["output_tok_s"] * 100
        for a, b in zip(runs["off"], runs["on"], strict=True)
    ]
    out["change_pct_paired"] = [round(p, 2) for p in pairs]
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


async def make_engine(path: Path, model, mconf, dtype, args, host_blocks: int) -> LLMEngine:
    config = EngineConfig(
        model=str(path),
        device=DEVICE,
        dtype=str(dtype).removeprefix("torch."),
        block_size=BLOCK_SIZE,
        num_blocks=args.gpu_blocks,
        host_kv_blocks=host_blocks,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        use_cuda_graphs=DEVICE == "cuda",
    )
    engine = LLMEngine(config, LocalAllocator(), model=model, model_config=mconf)
    await engine.start()
    return engine


def release(engine: LLMEngine) -> None:
    del engine
    gc.collect()
    if DEVICE == "cuda":
        torch.cuda.empty_cache()


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--conversations", type=int, default=64)
    ap.add_argument("--turns", type=int, default=4)
    ap.add_argument("--first-prompt", type=int, default=1024)
    ap.add_argument("--user-tokens", type=int, default=128)
    ap.add_argument("--output-tokens", type=int, default=64)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--pool-fraction", type=float, default=0.25, help="GPU pool / working set")
    ap.add_argument("--mixed-requests", type=int, default=128)
    ap.add_argument(
        "--mixed-only",
        action="store_true",
        help="only the mixed workload, tier off and on interleaved (--mixed-repeats)",
    )
    ap.add_argument("--mixed-repeats", type=int, default=5)
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--max-num-batched-tokens", type=int, default=8192)
    ap.add_argument("--bandwidth-blocks", type=int, default=1024)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tiny", action="store_true", help="CPU smoke run at toy sizes")
    args = ap.parse_args()
    global DEVICE
    args.mixed_prompt, args.mixed_output = (128, 1024), (64, 512)
    if args.tiny:
        DEVICE = "cpu"
        MODEL.update(TINY_MODEL, vocab_size=512)
        args.conversations, args.turns, args.first_prompt = 8, 3, 96
        args.user_tokens, args.output_tokens, args.concurrency = 16, 8, 2
        args.mixed_requests, args.mixed_prompt, args.mixed_output = 8, (32, 96), (8, 16)
        args.mixed_repeats = min(args.mixed_repeats, 2)
        args.max_num_seqs, args.max_num_batched_tokens = 16, 512
        args.bandwidth_blocks = 16
    # Working set: every conversation's history at its last turn, in blocks.
    last = (
        args.first_prompt
        + (args.turns - 1) * (args.user_tokens + args.output_tokens)
        + args.output_tokens
    )
    per_conv = -(-last // BLOCK_SIZE)
    working_set = per_conv * args.conversations
    args.gpu_blocks = max(int(working_set * args.pool_fraction), per_conv * args.concurrency + 8)
    host_blocks = int(working_set * 1.25)

    result: dict = {
        "bench": "tier",
        "device": torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu",
        "torch": torch.__version__,
        "block_size": BLOCK_SIZE,
        "working_set_blocks": working_set,
        "gpu_blocks": args.gpu_blocks,
        "host_blocks": host_blocks,
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
    dtype = torch.bfloat16 if DEVICE == "cuda" else torch.float32
    with torch.device(DEVICE):
        hf = transformers.LlamaForCausalLM(cfg).to(dtype).eval()
    tmp = Path(tempfile.mkdtemp(prefix="pm-tier-"))
    hf.save_pretrained(tmp)
    result["params_b"] = round(sum(p.numel() for p in hf.parameters()) / 1e9, 3)
    del hf
    model, mconf = load_model(tmp, DEVICE, dtype)
    log(f"model {result['params_b']}B; pool {args.gpu_blocks} blocks, host {host_blocks}")

    if args.mixed_only:
        engines = {
            arm: await make_engine(tmp, model, mconf, dtype, args, host)
            for arm, host in (("off", 0), ("on", host_blocks))
        }
        result["mixed_ab"] = await mixed_ab(engines, args)
        for engine in engines.values():
            await engine.close()
        print(json.dumps(result))
        return

    arms: dict[str, dict] = {}
    replies: dict[str, dict[str, list[int]]] = {}
    for arm, host in (("off", 0), ("on", host_blocks)):
        engine = await make_engine(tmp, model, mconf, dtype, args, host)
        # Warm-up (graphs, Triton, allocator caches) on a salt of its own.
        await Driver(engine, 4).run(
            [(f"w{i}", [7 + i] * (args.first_prompt // 2), 4) for i in range(4)]
        )
        log(f"tier {arm}: multi-turn")
        mt, replies[arm] = await multi_turn(engine, args, args.seed)
        log(f"tier {arm}: mixed")
        mx = await mixed(engine, args, args.seed + 1)
        arms[arm] = {"multi_turn": mt, "mixed": mx}
        if host:
            log("transfer bandwidth")
            result["transfer"] = transfer_bandwidth(engine, args.bandwidth_blocks)
        await engine.close()
        release(engine)
    result["arms"] = arms
    off, on = arms["off"]["multi_turn"], arms["on"]["multi_turn"]
    same = sum(replies["off"][k] == replies["on"][k] for k in replies["off"])
    result["multi_turn_same_replies"] = f"{same}/{len(replies['off'])}"
    on_p50 = on["ttft_returning_ms"]["p50"]
    result["ttft_returning_p50_speedup"] = (
        round(off["ttft_returning_ms"]["p50"] / on_p50, 2) if on_p50 else None
    )
    moff, mon = arms["off"]["mixed"]["output_tok_s"], arms["on"]["mixed"]["output_tok_s"]
    result["mixed_tok_s_change_pct"] = round((mon - moff) / moff * 100, 2) if moff else None
    print(json.dumps(result))


if __name__ == "__main__":
    asyncio.run(main())
