"""Single-stream decode of SmolLM2-135M-Instruct on CPU: pagemesh's LLMEngine against
transformers' `generate` on the same machine, side by side in one run. Prints one JSON line.

Decode tokens/s is measured the same way for both, so prefill and start-up cancel out:
    (N - 1) / (time to generate N tokens - time to generate 1 token)
each time the median of --repeats runs, greedy, EOS ignored, the same prompt.

    python benchmarks/cpu_decode_bench.py [--tokens 128] [--repeats 3] [--threads 0]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import time

import _repo  # noqa: F401  (first: the checkout's benchmarks/ and tests/ by name)
import torch
import transformers
from pagemesh.services.executor.config import EngineConfig
from pagemesh.services.executor.engine import LLMEngine
from pagemesh.services.executor.engine_api import SamplingParams
from pagemesh.services.executor.model.loader import DEFAULT_MODEL, load_model, resolve_model
from pagemesh.services.kvmanager.local import LocalAllocator
from transformers import AutoModelForCausalLM, AutoTokenizer

PROMPT = "Once upon a time, in a small village by the sea, there lived an old fisherman who"


def hf_time(model, ids: torch.Tensor, n: int) -> float:
    start = time.perf_counter()
    with torch.inference_mode():
        model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)
    return time.perf_counter() - start


async def ours_time(engine: LLMEngine, ids: list[int], n: int, tag: str) -> float:
    start = time.perf_counter()
    params = SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)
    # A fresh salt per run: no prefix hit, the same work as transformers does.
    engine.add_request(tag, ids, params, cache_salt=tag)
    count = 0
    while engine.has_unfinished_requests():
        for o in await engine.step():
            count += len(o.token_ids)
    assert count == n
    return time.perf_counter() - start


async def cpu_engine(path, model, config) -> LLMEngine:
    """The engine both CPU benchmarks time: in-process allocator, float32 on the CPU."""
    engine = LLMEngine(
        EngineConfig(model=str(path), device="cpu", num_blocks=1024),
        LocalAllocator(),
        model=model,
        model_config=config,
    )
    await engine.start()
    return engine


def decode_rate(t_n: list[float], t_1: list[float], n: int) -> float:
    return (n - 1) / (statistics.median(t_n) - statistics.median(t_1))


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    path = resolve_model(args.model)
    tok = AutoTokenizer.from_pretrained(path)
    ids = tok(PROMPT)["input_ids"]
    n = args.tokens

    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    engine = await cpu_engine(path, *load_model(path, "cpu", torch.float32))
    hf_ids = torch.tensor([ids])
    # Warm-up both, then interleave the timed runs so that load on the machine hits both alike.
    hf_time(hf, hf_ids, 4)
    await ours_time(engine, ids, 4, "warm")
    hf_n, hf_1, our_n, our_1 = [], [], [], []
    for r in range(args.repeats):
        hf_1.append(hf_time(hf, hf_ids, 1))
        hf_n.append(hf_time(hf, hf_ids, n))
        our_1.append(await ours_time(engine, ids, 1, f"a{r}"))
        our_n.append(await ours_time(engine, ids, n, f"b{r}"))
    ours_rate = decode_rate(our_n, our_1, n)
    hf_rate = decode_rate(hf_n, hf_1, n)
    print(
        json.dumps(
            {
                "bench": "cpu_decode",
                "model": path.name,
                "prompt_tokens": len(ids),
                "new_tokens": n,
                "repeats": args.repeats,
                "torch_threads": torch.get_num_threads(),
                "cpu_count": os.cpu_count(),
                "machine": platform.machine(),
                "torch": torch.__version__,
                "transformers": transformers.__version__,
                "pagemesh_tok_s": round(ours_rate, 2),
                "transformers_tok_s": round(hf_rate, 2),
                "ratio": round(ours_rate / hf_rate, 3),
                "pagemesh_e2e_s": round(statistics.median(our_n), 3),
                "transformers_e2e_s": round(statistics.median(hf_n), 3),
            }
        )
    )


if __name__ == "__main__":
    asyncio.run(main())
