"""Offline throughput on a GPU: pagemesh's LLMEngine against transformers, in one run.

Workload (DESIGN.md "mixed", offline): 256 requests at t=0, prompt lengths uniform 128..1024,
output lengths uniform 64..512, EOS ignored, random token ids, fixed seed; a random-weight
~1B Llama (hidden 2048, 16 layers, 32 heads, 8 KV heads, intermediate 8192, vocab 32000) in
bf16. The same weights serve every contender (saved once, loaded by our loader).

Contenders, in order: transformers `generate` in static batches of 32 (left-padded; a batch
decodes until its longest request is done; only the requested tokens count), transformers'
continuous batching (`init_continuous_batching`, if this transformers has it), then pagemesh
(in-process allocator, CUDA graphs). Then pagemesh's decode step time at batch 64 and 256
against its floor, (weight bytes + KV bytes read) / measured device copy bandwidth.
Prints one JSON line (progress goes to stderr).

    python benchmarks/throughput.py [--num-requests 256] [--hf-timeout 240] [--skip-hf]
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
import traceback
from collections.abc import Callable
from pathlib import Path

import _repo  # noqa: F401  (first: the checkout's benchmarks/ and tests/ by name)
import torch
import transformers
from pagemesh.services.executor.config import EngineConfig
from pagemesh.services.executor.engine import LLMEngine
from pagemesh.services.executor.engine_api import SamplingParams
from pagemesh.services.executor.model.loader import load_model
from pagemesh.services.kvmanager.local import LocalAllocator

MODEL = dict(
    hidden_size=2048,
    num_hidden_layers=16,
    num_attention_heads=32,
    num_key_value_heads=8,
    intermediate_size=8192,
    vocab_size=32000,
    max_position_embeddings=2048,
    tie_word_embeddings=False,
)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def workload(n: int, seed: int) -> list[tuple[list[int], int]]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        p = rng.randint(128, 1024)
        out.append(([rng.randrange(1, 32000) for _ in range(p)], rng.randint(64, 512)))
    return out


DEVICE = "cuda"


def sync_time() -> float:
    if DEVICE == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


# --tiny (here, tier_bench.py): the same architecture at toy sizes, for CPU smoke runs.
TINY_MODEL = dict(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=128,
)


# -- transformers ---------------------------------------------------------------------------------


def hf_static(model, reqs, batch_size: int, deadline: float) -> dict:
    useful = generated = 0
    start = sync_time()
    batches = 0
    for i in range(0, len(reqs), batch_size):
        if time.perf_counter() > deadline:
            break
        batch = reqs[i : i + batch_size]
        width = max(len(p) for p, _ in batch)
        new = max(o for _, o in batch)
        ids = torch.zeros(len(batch), width, dtype=torch.long)
        mask = torch.zeros(len(batch), width, dtype=torch.long)
        for j, (p, _) in enumerate(batch):  # left padding
            ids[j, width - len(p) :] = torch.tensor(p)
            mask[j, width - len(p) :] = 1
        with torch.inference_mode():
            model.generate(
                ids.to(DEVICE),
                attention_mask=mask.to(DEVICE),
                max_new_tokens=new,
                min_new_tokens=new,
                do_sample=False,
                pad_token_id=0,
                eos_token_id=None,
            )
        useful += sum(o for _, o in batch)
        generated += new * len(batch)
        batches += 1
        log(f"hf static batch {batches}: {sync_time() - start:.1f} s")
    elapsed = sync_time() - start
    return {
        "batches": batches,
        "complete": batches * batch_size >= len(reqs),
        "output_tokens": useful,
        "elapsed_s": round(elapsed, 2),
        "output_tok_s": round(useful / elapsed, 1),
        "generated_incl_padding_tok_s": round(generated / elapsed, 1),
    }


def hf_continuous(model, reqs, deadline: float) -> dict:
    if not hasattr(model, "init_continuous_batching"):
        return {"error": f"transformers {transformers.__version__} has no init_continuous_batching"}
    gen = transformers.GenerationConfig(
        max_new_tokens=max(o for _, o in reqs), do_sample=False, eos_token_id=None, pad_token_id=0
    )
    manager = model.init_continuous_batching(generation_config=gen)
    manager.start()
    try:
        start = sync_time()
        for i, (p, o) in enumerate(reqs):
            manager.add_request(p, request_id=f"r{i}", max_new_tokens=o)
        done = tokens = 0
        while done < len(reqs) and time.perf_counter() < deadline:
            res = manager.get_result(timeout=1.0)
            if res is None:
                continue
            if res.is_finished():
                done += 1
                tokens += len(res.generated_tokens)
        elapsed = sync_time() - start
    finally:
        manager.stop(block=True, timeout=30)
    return {
        "requests_done": done,
        "complete": done == len(reqs),
        "output_tokens": tokens,
        "elapsed_s": round(elapsed, 2),
        "output_tok_s": round(tokens / elapsed, 1),
    }


# -- pagemesh -------------------------------------------------------------------------------------


async def run_engine(engine: LLMEngine, reqs, tag: str) -> tuple[int, float, int]:
    for i, (p, o) in enumerate(reqs):
        params = SamplingParams(temperature=0.0, max_tokens=o, ignore_eos=True)
        engine.add_request(f"{tag}{i}", p, params, cache_salt=tag)
    tokens = steps = 0
    start = sync_time()
    while engine.has_unfinished_requests():
        for out in await engine.step():
            tokens += len(out.token_ids)
        steps += 1
    return tokens, sync_time() - start, steps


async def start_decode(engine: LLMEngine, batch: int, prompt_len: int, tag: str) -> None:
    """`batch` greedy requests of `prompt_len` random tokens (seeded by the batch size), run
    until every one is decoding, then 3 warm-up decode steps (benchmarks/step_profile.py too)."""
    rng = random.Random(batch)
    vocab = engine.model_config.vocab_size
    for i in range(batch):
        p = [rng.randrange(1, vocab) for _ in range(prompt_len)]
        params = SamplingParams(temperature=0.0, max_tokens=256, ignore_eos=True)
        engine.add_request(f"{tag}{i}", p, params, cache_salt=tag)
    sc = engine.scheduler
    while sc.waiting or any(s.is_prefill for s in sc.running):
        await engine.step()
    for _ in range(3):
        await engine.step()


async def timed_steps(engine: LLMEngine, n: int, sync: Callable[[], float]) -> list[float]:
    """Seconds of each of `n` engine steps, the device synchronized around each (`sync`)."""
    times = []
    for _ in range(n):
        t0 = sync()
        await engine.step()
        times.append(sync() - t0)
    return times


async def stop_decode(engine: LLMEngine, batch: int, tag: str) -> int:
    """Aborts start_decode's requests and drains the engine; returns the tokens they held."""
    ctx = sum(s.num_tokens for s in engine.scheduler.running)
    for i in range(batch):
        engine.abort_request(f"{tag}{i}")
    while engine.has_unfinished_requests():
        await engine.step()
    await engine.step()
    return ctx


async def decode_step_time(engine: LLMEngine, batch: int, prompt_len: int, tag: str) -> dict:
    await start_decode(engine, batch, prompt_len, tag)
    times = await timed_steps(engine, 30, sync_time)
    ctx = await stop_decode(engine, batch, tag)
    return {
        "batch": batch,
        "context_tokens_total": ctx,
        "step_ms": round(statistics.median(times) * 1e3, 3),
    }


def copy_bandwidth() -> float:
    """Bytes read + written per second of a large device-to-device copy."""
    src = torch.randn(2**28, device="cuda", dtype=torch.float32)  # 1 GiB
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(10):
        dst.copy_(src)
    b.record()
    b.synchronize()
    seconds = a.elapsed_time(b) / 1e3 / 10
    del src, dst
    return 2 * 2**30 / seconds


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--num-requests", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--hf-batch", type=int, default=32)
    ap.add_argument("--hf-timeout", type=float, default=240.0, help="seconds per HF contender")
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--max-num-batched-tokens", type=int, default=8192)
    ap.add_argument("--no-cuda-graphs", action="store_true")
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.6)
    ap.add_argument(
        "--tiny", action="store_true", help="CPU smoke run of this script (small model)"
    )
    args = ap.parse_args()
    global DEVICE
    if args.tiny:
        DEVICE = "cpu"
        MODEL.update(TINY_MODEL)

    result: dict = {
        "bench": "throughput_offline_mixed",
        "device": torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "num_requests": args.num_requests,
        "seed": args.seed,
    }
    try:
        import triton

        result["triton"] = triton.__version__
    except ImportError:
        pass
    reqs = workload(args.num_requests, args.seed)
    result["output_tokens"] = sum(o for _, o in reqs)
    result["prompt_tokens"] = sum(len(p) for p, _ in reqs)

    torch.manual_seed(args.seed)
    cfg = transformers.LlamaConfig(**MODEL, eos_token_id=None, bos_token_id=None, pad_token_id=0)
    dtype = torch.bfloat16 if DEVICE == "cuda" else torch.float32
    with torch.device(DEVICE):
        hf = transformers.LlamaForCausalLM(cfg).to(dtype).eval()
    hf.generation_config.eos_token_id = None
    tmp = Path(tempfile.mkdtemp(prefix="pm-1b-"))
    hf.save_pretrained(tmp)
    result["params_b"] = round(sum(p.numel() for p in hf.parameters()) / 1e9, 3)
    log(f"model {result['params_b']}B params saved to {tmp}")

    model, mconf = load_model(tmp, DEVICE, dtype)
    config = EngineConfig(
        model=str(tmp),
        device=DEVICE,
        dtype=str(dtype).removeprefix("torch."),
        num_blocks=4096 if DEVICE == "cpu" else None,
        max_num_seqs=256,
        max_num_batched_tokens=args.max_num_batched_tokens,
        use_cuda_graphs=not args.no_cuda_graphs,
        gpu_memory_utilization=args.gpu_memory_utilization,
    )
    engine = LLMEngine(config, LocalAllocator(), model=model, model_config=mconf)
    async_default = config.async_scheduling
    t0 = time.perf_counter()
    await engine.start()
    log(f"engine started in {time.perf_counter() - t0:.1f} s: {engine.pool.num_blocks} blocks")
    # Warm-up (Triton compiles, allocator caches): a few requests of the workload's shapes.
    await run_engine(engine, workload(8, args.seed + 1), "warm")
    # A/B in the same process: synchronous steps (land each step before scheduling the next).
    config.async_scheduling = False
    s_tokens, s_elapsed, _ = await run_engine(engine, reqs, "run_sync")
    result["pagemesh_sync_scheduling_tok_s"] = round(s_tokens / s_elapsed, 1)
    log(f"pagemesh sync scheduling: {s_tokens / s_elapsed:.1f} tok/s")
    config.async_scheduling = async_default
    tokens, elapsed, steps = await run_engine(engine, reqs, "run")
    ours = tokens / elapsed
    result["pagemesh"] = {
        "output_tokens": tokens,
        "elapsed_s": round(elapsed, 2),
        "steps": steps,
        "output_tok_s": round(ours, 1),
        "preemptions": engine.scheduler.num_preemptions,
        "num_blocks": engine.pool.num_blocks,
        "max_num_batched_tokens": config.max_num_batched_tokens,
        "cuda_graphs": config.use_cuda_graphs,
        "async_scheduling": config.async_scheduling,
    }
    log(f"pagemesh: {result['pagemesh']}")

    if DEVICE == "cuda":
        await decode_floor(engine, model, mconf, result)
    log(f"pagemesh phase: {json.dumps(result)}")
    # transformers runs in what the engine's pool (gpu_memory_utilization) left.
    del engine, model
    gc.collect()
    torch.cuda.empty_cache()
    if not args.skip_hf:
        try:
            result["transformers_static"] = hf_static(
                hf, reqs, args.hf_batch, time.perf_counter() + args.hf_timeout
            )
            log(f"transformers static: {result['transformers_static']}")
        except Exception as e:
            result["transformers_static"] = {"error": repr(e)}
            traceback.print_exc()
        torch.cuda.empty_cache()
        try:
            result["transformers_continuous"] = hf_continuous(
                hf, reqs, time.perf_counter() + args.hf_timeout
            )
            log(f"transformers continuous: {result['transformers_continuous']}")
        except Exception as e:
            result["transformers_continuous"] = {"error": repr(e)[:500]}
            traceback.print_exc()

    for key in ("transformers_static", "transformers_continuous"):
        rate = result.get(key, {}).get("output_tok_s")
        if rate:
            result[f"ratio_vs_{key}"] = round(ours / rate, 2)
    print(json.dumps(result), flush=True)


async def decode_floor(engine: LLMEngine, model, mconf, result: dict) -> None:
    bw = copy_bandwidth()
    weight_bytes = sum(
        p.numel() * p.element_size() for n, p in model.named_parameters() if "embed_tokens" not in n
    )
    kv_per_token = 2 * mconf.num_layers * mconf.num_kv_heads * mconf.head_dim * 2
    result["copy_bandwidth_GBps"] = round(bw / 1e9, 1)
    result["decode"] = []
    for batch, mode in ((64, True), (256, True), (64, False), (256, False)):
        engine.config.async_scheduling = mode
        d = await decode_step_time(engine, batch, 512, f"d{batch}{mode}_")
        d["async_scheduling"] = mode
        floor = (weight_bytes + d["context_tokens_total"] * kv_per_token) / bw
        d["floor_ms"] = round(floor * 1e3, 3)
        d["step_over_floor"] = round(d["step_ms"] / (floor * 1e3), 2)
        result["decode"].append(d)
        log(f"decode: {d}")


if __name__ == "__main__":
    asyncio.run(main())
