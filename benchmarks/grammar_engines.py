"""xgrammar against llguidance on pagemesh's structured-output workload, the measurement that
chose the executor's grammar engine (benchmarks/RESULTS.md). CPU only; prints one JSON line.

For each engine, SmolLM2's tokenizer (49,152 tokens) and the 30 schemas of
tests/support/schemas.py:
- set-up: the tokenizer's vocabulary made into the engine's token index (once per process);
- compile: each schema cold (no cache), the time until the first mask is ready (llguidance
  compiles lazily, so its matcher creation and first mask count; for xgrammar the compile call
  and the matcher's first mask);
- mask: per-token mask fill of one sequence on a seeded random walk through each schema's
  language (each step: fill the mask, take a random allowed token, accept it), up to 48 tokens.

    python benchmarks/grammar_engines.py [--walk 48]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from typing import Any

import _repo  # noqa: F401  (first: the checkout's benchmarks/ and tests/ by name)
import torch
from pagemesh.services.executor.model.loader import DEFAULT_MODEL, resolve_model
from transformers import AutoTokenizer

from tests.support.schemas import SCHEMAS


def _allowed(bitmask: torch.Tensor, vocab: int) -> list[int]:
    bits = bitmask[0].numpy().view("uint32")
    ids = []
    for w, word in enumerate(bits.tolist()):
        while word:
            low = word & -word
            ids.append(w * 32 + low.bit_length() - 1)
            word ^= low
    return [i for i in ids if i < vocab]


def _pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def _summary(compile_s: list[float], mask_s: list[float], setup_s: float) -> dict[str, Any]:
    return {
        "setup_s": round(setup_s, 3),
        "compile_ms_p50": round(statistics.median(compile_s) * 1e3, 3),
        "compile_ms_p99": round(_pct(compile_s, 0.99) * 1e3, 3),
        "compile_ms_max": round(max(compile_s) * 1e3, 3),
        "mask_us_p50": round(statistics.median(mask_s) * 1e6, 1),
        "mask_us_p99": round(_pct(mask_s, 0.99) * 1e6, 1),
        "mask_tokens": len(mask_s),
    }


def bench_xgrammar(tok: Any, vocab: int, eos: list[int], walk: int) -> dict[str, Any]:
    import xgrammar as xgr

    start = time.perf_counter()
    info = xgr.TokenizerInfo.from_huggingface(tok, vocab_size=vocab, stop_token_ids=eos)
    setup = time.perf_counter() - start
    compile_s: list[float] = []
    mask_s: list[float] = []
    rng = random.Random(0)
    bitmask = xgr.allocate_token_bitmask(1, vocab)
    for _, schema in SCHEMAS:
        compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
        start = time.perf_counter()
        compiled = compiler.compile_json_schema(json.dumps(schema), any_whitespace=False)
        matcher = xgr.GrammarMatcher(compiled)
        matcher.fill_next_token_bitmask(bitmask, 0)
        compile_s.append(time.perf_counter() - start)
        for _ in range(walk):
            start = time.perf_counter()
            matcher.fill_next_token_bitmask(bitmask, 0)
            mask_s.append(time.perf_counter() - start)
            allowed = _allowed(bitmask, vocab)
            token = rng.choice(allowed)
            assert matcher.accept_token(token)
            if matcher.is_terminated():
                break
    return _summary(compile_s, mask_s, setup)


def bench_llguidance(tok: Any, vocab: int, eos: list[int], walk: int) -> dict[str, Any]:
    import llguidance
    import llguidance.hf
    import llguidance.torch

    start = time.perf_counter()
    lltok = llguidance.hf.from_tokenizer(tok, n_vocab=vocab, eos_token=eos[0])
    setup = time.perf_counter() - start
    compile_s: list[float] = []
    mask_s: list[float] = []
    rng = random.Random(0)
    bitmask = llguidance.torch.allocate_token_bitmask(1, vocab)
    for _, schema in SCHEMAS:
        start = time.perf_counter()
        grammar = llguidance.LLMatcher.grammar_from_json_schema(
            json.dumps(schema), defaults={"whitespace_flexible": False}
        )
        matcher = llguidance.LLMatcher(lltok, grammar)
        llguidance.torch.fill_next_token_bitmask(matcher, bitmask, 0)
        compile_s.append(time.perf_counter() - start)
        assert not matcher.is_error(), matcher.get_error()
        for _ in range(walk):
            start = time.perf_counter()
            llguidance.torch.fill_next_token_bitmask(matcher, bitmask, 0)
            mask_s.append(time.perf_counter() - start)
            allowed = _allowed(bitmask, vocab)
            token = rng.choice(allowed)
            assert matcher.consume_token(token), matcher.get_error()
            if matcher.is_stopped():
                break
    return _summary(compile_s, mask_s, setup)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--walk", type=int, default=48)
    args = ap.parse_args()
    torch.set_num_threads(1)
    tok = AutoTokenizer.from_pretrained(resolve_model(DEFAULT_MODEL))
    vocab = 49152
    eos = [tok.convert_tokens_to_ids("<|im_end|>")]
    print(
        json.dumps(
            {
                "bench": "grammar_engines",
                "schemas": len(SCHEMAS),
                "vocab": vocab,
                "xgrammar": bench_xgrammar(tok, vocab, eos, args.walk),
                "llguidance": bench_llguidance(tok, vocab, eos, args.walk),
            }
        )
    )


if __name__ == "__main__":
    main()
