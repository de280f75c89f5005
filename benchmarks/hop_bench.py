"""What the kvmanager hop costs the engine: the same offline workload through the in-process
allocator and through a real kvmanager over gRPC (with Redis behind it), arms interleaved, after one untimed run.

The serving suite (serve_bench.py) measures the same A/B through the whole mesh, where the
gateway, the clients and executor restarts add their own noise; here only the allocator
differs between arms: one model, one process, engines built afresh per run, and the arms
alternate (local, grpc, local, grpc, ...) so drift hits both alike. Workload: DESIGN.md's mixed
(prompt lengths 128..1024, outputs 64..512, EOS ignored), random token ids, fixed seed; every
run gets the same requests under a fresh cache salt, so no run hits what an earlier one cached.

    python benchmarks/hop_bench.py --model /tmp/rand1b --reps 3            # GPU
    python benchmarks/hop_bench.py --tiny --reps 2 --num-requests 64       # CPU, tiny model

Prints one JSON line: every run's output tokens/s, and grpc over local (mean of the runs).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _repo  # noqa: F401  (first: the checkout's benchmarks/ and tests/ by name)
import torch
from pagemesh.services.executor.config import EngineConfig
from pagemesh.services.executor.engine import LLMEngine
from pagemesh.services.executor.engine_api import SamplingParams
from pagemesh.services.kvmanager.client import KVManagerClient
from pagemesh.services.kvmanager.local import LocalAllocator

from pagemesh.redis_process import RedisProcess, free_port

TINY = dict(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=128,
    vocab_size=32000,
    max_position_embeddings=2048,
)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def workload(n: int, seed: int, vocab: int) -> list[tuple[list[int], int]]:
    rng = random.Random(seed)
    return [
        ([rng.randrange(1, vocab) for _ in range(rng.randint(128, 1024))], rng.randint(64, 512))
        for _ in range(n)
    ]


async def start_kvmanager(workdir: Path) -> tuple[RedisProcess, subprocess.Popen, str]:
    redis = RedisProcess(data_dir=workdir / "redis", log_path=workdir / "redis.log").start()
    port = free_port()
    log_file = open(workdir / "kvmanager.log", "ab")  # noqa: SIM115 (lives as long as the process)
    proc = subprocess.Popen(
        [sys.executable, "-P", "-m", "pagemesh.cli", "kvmanager", "--port", str(port),
         "--redis-url", redis.url, "--metrics-port", "0", "--log-level", "warning"],
        cwd=Path(__file__).resolve().parents[1],
        stdout=log_file,
        stderr=subprocess.STDOUT,
    )  # fmt: skip
    address = f"127.0.0.1:{port}"

    async def ready() -> None:
        client = KVManagerClient(address, "probe", timeout=1.0)
        try:
            for _ in range(300):
                try:
                    await client.get_stats(all_executors=True)
                    return
                except Exception as e:
                    if proc.poll() is not None:
                        log_path = workdir / "kvmanager.log"
                        raise RuntimeError(f"kvmanager exited: see {log_path}") from e
                    await asyncio.sleep(0.1)
            raise RuntimeError("kvmanager did not answer in 30 s")
        finally:
            await client.close()

    await ready()
    return redis, proc, address


async def run_once(
    config: EngineConfig, allocator, model, mconf, reqs, salt: str
) -> dict[str, float]:
    engine = LLMEngine(config, allocator, model=model, model_config=mconf)
    await engine.start()
    for i, (p, o) in enumerate(reqs):
        params = SamplingParams(temperature=0.0, max_tokens=o, ignore_eos=True)
        engine.add_request(f"r{i}", p, params, cache_salt=salt)
    tokens = steps = 0
    if config.device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    cpu0 = time.process_time()
    while engine.has_unfinished_requests():
        for out in await engine.step():
            tokens += len(out.token_ids)
        steps += 1
    elapsed = time.perf_counter() - start
    cpu = time.process_time() - cpu0
    await allocator.close()
    return {
        "output_tok_s": round(tokens / elapsed, 1),
        "elapsed_s": round(elapsed, 3),
        "steps": steps,
        "step_ms": round(elapsed / steps * 1e3, 3),
        "process_cpu_s": round(cpu, 2),
        "kvmanager_step_calls": engine.scheduler.link.num_step_calls,
    }


async def amain() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="HF model directory (e.g. make_random_model.py's)")
    ap.add_argument("--tiny", action="store_true", help="a tiny random model (CPU)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--num-requests", type=int, default=256)
    ap.add_argument("--reps", type=int, default=3, help="runs per arm, interleaved")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.6)
    ap.add_argument("--num-blocks", type=int, default=None, help="default: profiled (CPU 4096)")
    args = ap.parse_args()
    if not args.model and not args.tiny:
        ap.error("--model DIR or --tiny")

    from pagemesh.services.executor.model.loader import load_model

    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    model_dir = args.model
    if args.tiny:
        import transformers

        torch.manual_seed(args.seed)
        cfg = transformers.LlamaConfig(**TINY, eos_token_id=None, bos_token_id=None)
        model_dir = tempfile.mkdtemp(prefix="pm-hop-")
        transformers.LlamaForCausalLM(cfg).save_pretrained(model_dir)
    model, mconf = load_model(Path(model_dir), args.device, dtype)
    reqs = workload(args.num_requests, args.seed, mconf.vocab_size)
    workdir = Path(tempfile.mkdtemp(prefix="pm-hop-"))
    redis, kvm, address = await start_kvmanager(workdir)
    config = EngineConfig(
        model=model_dir,
        device=args.device,
        dtype=str(dtype).removeprefix("torch."),
        num_blocks=args.num_blocks or (4096 if args.device == "cpu" else None),
        gpu_memory_utilization=args.gpu_memory_utilization,
    )
    runs: dict[str, list[dict[str, float]]] = {"local": [], "grpc": []}
    try:
        # One untimed run of the whole workload first: Triton compiles a kernel variant per new
        # specialization (seen mid-run after a short warm-up), and the compiled kernels serve
        # every engine of this process after it.
        warm = await run_once(config, LocalAllocator(), model, mconf, reqs, "warm")
        log(f"warm-up run: {warm}")
        gc.collect()
        if args.device == "cuda":
            torch.cuda.empty_cache()
        for rep in range(args.reps):
            for arm in ("local", "grpc"):
                allocator = (
                    LocalAllocator()
                    if arm == "local"
                    else KVManagerClient(address, executor_id=f"hop-{rep}")
                )
                r = await run_once(config, allocator, model, mconf, reqs, f"{arm}{rep}")
                log(f"{arm} run {rep}: {r}")
                runs[arm].append(r)
                gc.collect()
                if args.device == "cuda":
                    torch.cuda.empty_cache()
    finally:
        kvm.terminate()
        kvm.wait(10)
        redis.cleanup()

    def mean(arm: str) -> float:
        return statistics.fmean(r["output_tok_s"] for r in runs[arm])

    result = {
        "bench": "kvmanager_hop",
        "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "torch": torch.__version__,
        "model": "tiny" if args.tiny else Path(model_dir).name,
        "num_requests": args.num_requests,
        "runs": runs,
        "local_tok_s_mean": round(mean("local"), 1),
        "grpc_tok_s_mean": round(mean("grpc"), 1),
        "grpc_over_local": round(mean("grpc") / mean("local"), 4),
        "grpc_over_local_per_rep": [
            round(g["output_tok_s"] / loc["output_tok_s"], 4)
            for g, loc in zip(runs["grpc"], runs["local"], strict=True)
        ],
    }
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(amain()))
