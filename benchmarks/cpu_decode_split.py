"""Where a single-stream CPU decode step's time goes, pagemesh against transformers, part by part.

The model and prompt of benchmarks/cpu_decode_bench.py (SmolLM2-135M-Instruct, float32, greedy).
pagemesh: `LLMEngine.step` at batch 1 with the forward run inline (torch.profiler records the
thread it was started in); transformers: `generate` (greedy), per token as cpu_decode_bench.py
counts it: a run of N + 1 tokens less a run of 1, divided by N (sampling is inside its `other`). Each side's functions that do one part are wrapped in a
`record_function` label, and a part's time is the profiler's inclusive CPU time per step:
  gemm         the layers' projections (nn.Linear other than the logits)
  lm_head      the logits' projection
  attention    the attention over the context (pagemesh: the gather from the paged cache too)
  kv_write     the new token's K and V into the cache (transformers: DynamicCache's cat)
  norm, rope, silu_mul, sampling
  other        the rest of the step: the embedding, residual adds (transformers), the ops'
               dispatch between parts; pagemesh: the engine's host work besides the forward,
               also reported alone as `engine_host_ms` (schedule, inputs, outputs)
First the median wall time per token unprofiled (pagemesh: of --steps steps; transformers: of
3 generate pairs), then --steps tokens profiled. Prints one JSON
line per side. The profiler slows small ops (both sides alike); on a machine shared with other
processes, multi-threaded small ops slow down several-fold: note the load beside the figures.

    python benchmarks/cpu_decode_split.py [--side both|pagemesh|transformers] [--steps 30]
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

import _repo  # noqa: F401  (first: the checkout's benchmarks/ and tests/ by name)
import torch
from pagemesh.services.executor.engine_api import SamplingParams
from pagemesh.services.executor.model.loader import DEFAULT_MODEL, load_model, resolve_model
from torch import nn
from torch.profiler import ProfilerActivity, profile, record_function
from transformers import AutoModelForCausalLM, AutoTokenizer

from benchmarks.cpu_decode_bench import PROMPT, cpu_engine
from benchmarks.step_profile import InlineExecutor


def labelled(part: str, fn: Callable) -> Callable:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with record_function("part:" + part):
            return fn(*args, **kwargs)

    return wrapper


def label_linears(model: nn.Module, vocab_size: int) -> None:
    for m in model.modules():
        if isinstance(m, nn.Linear):
            m.forward = labelled("lm_head" if m.out_features == vocab_size else "gemm", m.forward)  # type: ignore[method-assign]


def parts_of(prof: profile, steps: int) -> dict[str, float]:
    return {
        e.key.removeprefix("part:"): e.cpu_time_total / 1e3 / steps
        for e in prof.key_averages()
        if e.key.startswith("part:")
    }


def split(parts: dict[str, float], nested: tuple[str, ...] = ()) -> dict[str, float]:
    """The labelled parts and `other`, summing to the step (`nested`: labels that contain
    others, left out of the sum)."""
    step = parts.pop("step")
    for name in nested:
        parts.pop(name, None)
    parts["other"] = step - sum(parts.values())
    return {k: round(v, 2) for k, v in sorted(parts.items(), key=lambda kv: -kv[1])}


def load_avg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def transformers_side(path: Any, ids: list[int], steps: int) -> dict:
    from transformers import cache_utils
    from transformers.models.llama import modeling_llama as ml

    ml.LlamaRMSNorm.forward = labelled("norm", ml.LlamaRMSNorm.forward)  # type: ignore[method-assign]
    ml.apply_rotary_pos_emb = labelled("rope", ml.apply_rotary_pos_emb)
    ml.LlamaRotaryEmbedding.forward = labelled("rope", ml.LlamaRotaryEmbedding.forward)  # type: ignore[method-assign]
    ml.ALL_ATTENTION_FUNCTIONS["sdpa"] = labelled("attention", ml.ALL_ATTENTION_FUNCTIONS["sdpa"])
    cache_utils.DynamicLayer.update = labelled("kv_write", cache_utils.DynamicLayer.update)  # type: ignore[method-assign]
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    label_linears(hf, hf.config.vocab_size)
    for m in hf.modules():
        if isinstance(m, ml.LlamaMLP):
            m.act_fn.forward = labelled("silu_mul", m.act_fn.forward)  # the silu; its mul inline
    prompt = torch.tensor([ids])

    def generate(n: int) -> None:
        with torch.inference_mode(), record_function("part:step"):
            hf.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False)

    # As cpu_decode_bench.py measures: `generate` of N tokens less `generate` of 1, per token
    # (the prefill and generate's set-up cancel out), part by part.
    generate(4)
    wall = []
    for _ in range(3):
        start = time.perf_counter()
        generate(1)
        one = time.perf_counter() - start
        start = time.perf_counter()
        generate(steps + 1)
        wall.append((time.perf_counter() - start - one) / steps)
    with profile(activities=[ProfilerActivity.CPU]) as prof_1:
        generate(1)
    with profile(activities=[ProfilerActivity.CPU]) as prof_n:
        generate(steps + 1)
    parts_1, parts_n = parts_of(prof_1, 1), parts_of(prof_n, 1)
    parts = {k: (v - parts_1.get(k, 0.0)) / steps for k, v in parts_n.items()}
    return {
        "side": "transformers",
        "step_ms": round(statistics.median(wall) * 1e3, 2),
        "parts_ms": split(parts),
    }


async def pagemesh_side(path: Any, ids: list[int], steps: int) -> dict:
    from pagemesh.services.executor import sampler
    from pagemesh.services.executor.model import llama, ops

    from pagemesh import kernels

    ops.rms_norm = labelled("norm", ops.rms_norm)
    ops.add_rms_norm = labelled("norm", ops.add_rms_norm)
    ops.qk_norm_rope = labelled("rope", ops.qk_norm_rope)
    ops.silu_mul = labelled("silu_mul", ops.silu_mul)
    kernels.write_kv_cache = labelled("kv_write", kernels.write_kv_cache)
    kernels.paged_decode_attention = labelled("attention", kernels.paged_decode_attention)
    sampler.Sampler.__call__ = labelled("sampling", sampler.Sampler.__call__)  # type: ignore[method-assign]
    model, config = load_model(path, "cpu", torch.float32)
    llama.LlamaForCausalLM.compute_logits = labelled(  # type: ignore[method-assign]
        "lm_head", llama.LlamaForCausalLM.compute_logits
    )
    label_linears(model, config.vocab_size)
    engine = await cpu_engine(path, model, config)
    runner = engine.runner
    runner._worker = InlineExecutor()
    runner._forward = labelled("forward", runner._forward)  # type: ignore[method-assign]
    params = SamplingParams(temperature=0.0, max_tokens=2 * steps + 20, ignore_eos=True)
    engine.add_request("split", ids, params, cache_salt="split")

    async def one() -> None:
        with record_function("part:step"):
            await engine.step()

    for _ in range(6):
        await one()
    wall = []
    for _ in range(steps):
        start = time.perf_counter()
        await one()
        wall.append(time.perf_counter() - start)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            await one()
    parts = parts_of(prof, steps)
    host = parts["step"] - parts["forward"] - parts.get("sampling", 0.0)
    return {
        "side": "pagemesh",
        "step_ms": round(statistics.median(wall) * 1e3, 2),
        "parts_ms": split(parts, nested=("forward",)),
        "engine_host_ms": round(host, 2),
    }


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--side", choices=("both", "pagemesh", "transformers"), default="both")
    ap.add_argument("--steps", type=int, default=30)
    args = ap.parse_args()
    path = resolve_model(DEFAULT_MODEL)
    ids = AutoTokenizer.from_pretrained(path)(PROMPT)["input_ids"]
    common = {"bench": "cpu_decode_split", "torch_threads": torch.get_num_threads()}
    # Each side patches its own functions: transformers first, it loads nothing of pagemesh's.
    if args.side in ("both", "transformers"):
        result = transformers_side(path, ids, args.steps)
        print(json.dumps({**common, **result, "load": load_avg()}), flush=True)
    if args.side in ("both", "pagemesh"):
        result = await pagemesh_side(path, ids, args.steps)
        print(json.dumps({**common, **result, "load": load_avg()}), flush=True)


if __name__ == "__main__":
    asyncio.run(main())
