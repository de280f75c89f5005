"""KV blocks held by beam search with shared blocks (fork + copy-on-write) against the same
search with no sharing, where every beam holds its own copy of its whole block table.

SmolLM2-135M-Instruct on CPU, the real LLMEngine on the in-process allocator (kvmanager's own
core). After every allocator call and every engine step, it reads kvmanager's pool:
    held     = blocks with ref count > 0 (shared blocks counted once),
    unshared = sum of the live tables' lengths (what the beams would hold as private copies),
so both figures include the same look-ahead reservations. Each request runs alone with its own
cache salt, so only sharing between the beams of one request is counted. Reported per workload
and width: the peak of each request (summed over requests) and the time average over steps,
as the PagedAttention paper's "memory saving" (blocks saved by sharing / blocks without it).

Workloads (fixed prompts, chat template, EOS ignored so every search runs to max_tokens):
  alpaca:   short instructions, 64 new tokens (the paper's Alpaca: ~19 in, ~58 out)
  sharegpt: long user turns (~170-200 prompt tokens), 160 new tokens (ShareGPT: ~161 in,
            ~338 out; shortened for CPU time)

    python benchmarks/beam_memory.py [--widths 4 8] [--quick]
Prints one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from dataclasses import dataclass
from pathlib import Path

import _repo  # noqa: F401  (first: the checkout's benchmarks/ and tests/ by name)
import torch
from pagemesh.services.executor.config import EngineConfig
from pagemesh.services.executor.engine import LLMEngine
from pagemesh.services.executor.engine_api import SamplingParams
from pagemesh.services.executor.model.loader import DEFAULT_MODEL, load_model, resolve_model
from pagemesh.services.kvmanager.local import LocalAllocator
from transformers import AutoTokenizer

ALPACA = [
    "Give three tips for staying healthy.",
    "Describe the water cycle in simple terms.",
    "Write a short poem about the ocean.",
    "Explain why the sky is blue.",
    "Suggest a name for a bakery that sells only bread.",
    "List the main steps of making a cup of tea.",
    "Summarize the plot of Romeo and Juliet in two sentences.",
    "Convert 25 degrees Celsius to Fahrenheit and explain the formula.",
]
_LONG = (
    "I run a small online shop that sells handmade ceramic mugs, bowls and plates. Orders come "
    "in through a website builder, payments go through a card processor, and I pack and ship "
    "everything myself from a spare room. Last month sales doubled after a post went viral, and "
    "now I spend most evenings printing labels, answering emails about delivery times and "
    "fixing mistakes in the inventory spreadsheet. Two customers received the wrong glaze color "
    "and one parcel was lost. I am thinking about hiring a part-time helper, moving to a proper "
    "inventory tool, and offering pre-orders for popular items instead of promising stock I do "
    "not have. "
)
SHAREGPT = [
    _LONG + "What should I do first, and why? Give me a concrete plan for the next month.",
    _LONG + "Write a friendly email to the customers who got the wrong color, with an offer.",
    "Here is my situation. " + _LONG + "Which of my three ideas is the riskiest, and how do I "
    "test it cheaply before committing?",
]
WORKLOADS = {"alpaca": (ALPACA, 64), "sharegpt": (SHAREGPT, 160)}
PAPER = {"alpaca": "37.6-55.2%", "sharegpt": "44.3-66.3%"}


@dataclass(slots=True)
class Meter:
    """Samples kvmanager's pool; `begin()` starts one request's peaks."""

    engine: LLMEngine
    peak_held: int = 0
    peak_unshared: int = 0
    sum_held: int = 0  # over engine steps
    sum_unshared: int = 0

    def counts(self) -> tuple[int, int]:
        alloc = self.engine.allocator
        ex = alloc.manager.executors[alloc.executor_id]
        held = sum(1 for r in ex.pool.ref if r > 0)
        unshared = sum(len(s.blocks) for s in ex.seqs.values())
        return held, unshared

    def sample(self) -> None:
        held, unshared = self.counts()
        self.peak_held = max(self.peak_held, held)
        self.peak_unshared = max(self.peak_unshared, unshared)

    def step(self) -> None:
        held, unshared = self.counts()
        self.sum_held += held
        self.sum_unshared += unshared
        self.sample()

    def begin(self) -> None:
        self.peak_held = self.peak_unshared = 0

    def instrument(self) -> None:
        alloc = self.engine.allocator
        for name in ("allocate", "extend", "fork", "release", "commit"):
            fn = getattr(alloc, name)

            async def call(*args, _fn=fn, **kwargs):
                result = await _fn(*args, **kwargs)
                self.sample()
                return result

            setattr(alloc, name, call)


def _saved(held: int, unshared: int) -> float:
    return round(100.0 * (1.0 - held / unshared), 1) if unshared else 0.0


async def run_width(
    engine: LLMEngine, meter: Meter, prompts: list[list[int]], width: int, max_new: int
) -> dict:
    peak_held = peak_unshared = 0
    meter.sum_held = meter.sum_unshared = 0
    per_request = []
    for i, ids in enumerate(prompts):
        rid = f"w{width}-{i}"
        params = SamplingParams(
            n=1,
            temperature=0.0,
            max_tokens=max_new,
            ignore_eos=True,
            use_beam_search=True,
            beam_width=width,
        )
        meter.begin()
        engine.add_request(rid, ids, params, cache_salt=rid)  # no prefix shared across requests
        while engine.has_unfinished_requests():
            await engine.step()
            meter.step()
        peak_held += meter.peak_held
        peak_unshared += meter.peak_unshared
        per_request.append(_saved(meter.peak_held, meter.peak_unshared))
    return {
        "requests": len(prompts),
        "avg_prompt_tokens": round(sum(map(len, prompts)) / len(prompts), 1),
        "new_tokens": max_new,
        "peak_blocks_shared": peak_held,
        "peak_blocks_unshared": peak_unshared,
        "peak_saved_pct": _saved(peak_held, peak_unshared),
        "peak_saved_pct_per_request": [min(per_request), max(per_request)],
        "avg_saved_pct": _saved(meter.sum_held, meter.sum_unshared),
    }


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--widths", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--quick", action="store_true", help="2 prompts, 16 new tokens (smoke run)")
    args = ap.parse_args()
    torch.manual_seed(0)
    path = resolve_model(DEFAULT_MODEL)
    tok = AutoTokenizer.from_pretrained(path)
    model, mc = load_model(path, "cpu", torch.float32)
    config = EngineConfig(
        model=str(path), device="cpu", num_blocks=2048, block_size=args.block_size
    )
    engine = LLMEngine(config, LocalAllocator(), model=model, model_config=mc)
    await engine.start()
    meter = Meter(engine)
    meter.instrument()
    start = time.perf_counter()
    results: dict = {}
    for name, (texts, max_new) in WORKLOADS.items():
        if args.quick:
            texts, max_new = texts[:2], 16
        prompts = []
        for text in texts:
            ids = tok.apply_chat_template(
                [{"role": "user", "content": text}], add_generation_prompt=True
            )
            prompts.append(list(ids["input_ids"] if hasattr(ids, "keys") else ids))
        results[name] = {"paper_saved": PAPER[name]}
        for width in args.widths:
            results[name][f"width{width}"] = await run_width(engine, meter, prompts, width, max_new)
    alloc = engine.allocator
    ex = alloc.manager.executors[alloc.executor_id]
    assert not ex.seqs and all(r == 0 for r in ex.pool.ref), "blocks left held"
    print(
        json.dumps(
            {
                "bench": "beam_memory",
                "model": Path(path).name,
                "device": "cpu",
                "block_size": args.block_size,
                "num_lookahead_tokens": config.num_lookahead_tokens,
                "length_penalty": 1.0,
                "workloads": results,
                "seconds": round(time.perf_counter() - start, 1),
            }
        )
    )


if __name__ == "__main__":
    asyncio.run(main())
