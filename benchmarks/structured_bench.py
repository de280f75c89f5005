"""Structured output's cost on the engine (issue 23): output tokens/s of a batch all constrained
by one JSON schema against the same batch unconstrained, a mixed batch (a quarter constrained)
whose unconstrained part is compared with the unconstrained batch, and grammar compile time per
schema (cold p50 / p99, then the cache hit). Prints one JSON line.

Every arm is the same `--batch` requests (chat prompts from SmolLM2's tokenizer), greedy,
`--max-tokens` each with EOS ignored, on one engine in one process (in-process allocator), the
arms interleaved `--rounds` times; the figure of an arm is its median round. The schema is an
open-ended array of records, so a random-weight model's long run mostly stays inside it (if it
closes the array, the forced EOS is ignored and the rest of that sequence runs on an all-ones
mask: it still pays the mask's kernel, not the matcher).

    # GPU (the lead, device tool; SmolLM2's tokenizer files in .tok/, the wheels in .whl/):
    python benchmarks/structured_bench.py --tokenizer .tok
    # CPU smoke run, tiny random model, the same code path:
    python benchmarks/structured_bench.py --tiny --batch 8 --max-tokens 16 --rounds 1

Besides the rates: `step_us`, each arm's wall time per engine step, and
`guided_host_us_per_step`, the engine's own host time per step with constrained rows
(grammar.GuidedTimes: accept, fill, apply); `--fill-threads` sets the mask fill's threads.
"""

from __future__ import annotations

import argparse
import asyncio
import json
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
from pagemesh.services.executor.engine_api import FinishReason, Guide, GuideKind, SamplingParams
from pagemesh.services.executor.grammar import GrammarCompiler
from pagemesh.services.executor.model.loader import load_model
from pagemesh.services.kvmanager.local import LocalAllocator

from benchmarks.make_random_model import make
from tests.support.schemas import SCHEMAS

# Open-ended on purpose: a long run stays inside the grammar (an array of records).
BENCH_SCHEMA = {
    "type": "array",
    "items": {
        "type": "object",
        "properties": {
            "id": {"type": "integer"},
            "name": {"type": "string"},
            "active": {"type": "boolean"},
            "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}},
            "score": {"type": "number"},
        },
        "required": ["id", "name", "active", "tags", "score"],
        "additionalProperties": False,
    },
}
GUIDE = Guide(GuideKind.JSON_SCHEMA, json.dumps(BENCH_SCHEMA))


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def sync_time() -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter()


def prompts(tokenizer_dir: Path, n: int) -> list[list[int]]:
    tok = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    out = []
    for i in range(n):
        msgs = [{"role": "user", "content": f"List the records of shelf {i} as JSON."}]
        ids = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
        out.append(list(ids["input_ids"] if hasattr(ids, "keys") else ids))
    return out


async def run_arm(
    engine: LLMEngine, reqs: list[list[int]], guided: list[bool], max_tokens: int, tag: str
) -> dict:
    for i, (p, g) in enumerate(zip(reqs, guided, strict=True)):
        params = SamplingParams(
            temperature=0.0, max_tokens=max_tokens, ignore_eos=True, guide=GUIDE if g else None
        )
        engine.add_request(f"{tag}-{i}", p, params)
    tokens = {True: 0, False: 0}
    errors = 0
    times = engine.guided.times
    fields = ("accept_s", "fill_s", "apply_s", "upload_s", "steps")
    before = (*(getattr(times, f) for f in fields), engine.num_steps)
    phases = {"schedule": 0.0, "launch": 0.0, "land": 0.0}
    start = sync_time()
    while engine.has_unfinished_requests():
        outs = await engine.step()
        st = engine.step_times
        phases["schedule"] += st.schedule
        phases["launch"] += st.launch
        phases["land"] += st.land
        for out in outs:
            g = guided[int(out.request_id.rsplit("-", 1)[1])]
            tokens[g] += len(out.token_ids)
            errors += out.finish_reason == FinishReason.ERROR
    elapsed = sync_time() - start
    accept_s, fill_s, apply_s, upload_s, guided_steps, steps = (
        now - was
        for now, was in zip(
            (*(getattr(times, f) for f in fields), engine.num_steps), before, strict=True
        )
    )
    # A sampled token its grammar refuses ends the choice with an error (a masking bug).
    assert not errors, f"{errors} choices left their grammar"
    n_g = sum(guided)
    n_u = len(guided) - n_g
    return {
        "elapsed_s": elapsed,
        "tok_s": (tokens[True] + tokens[False]) / elapsed,
        # Per-sequence rates: the unconstrained part of a mixed batch against a whole batch.
        "constrained_tok_s_per_seq": tokens[True] / n_g / elapsed if n_g else None,
        "unconstrained_tok_s_per_seq": tokens[False] / n_u / elapsed if n_u else None,
        # Where a step's time goes: its wall time, and the guided path's host time per step
        # with constrained rows (grammar.GuidedTimes: accept, fill, apply).
        "step_us": elapsed / steps * 1e6 if steps else None,
        # The engine's step phases (trace.StepTimes), us a step: land holds the wait for the
        # device, so a host-bound step shows a short land.
        "phase_us": {k: round(v / steps * 1e6, 1) for k, v in phases.items()} if steps else None,
        "guided_host_us_per_step": {
            "accept": accept_s / guided_steps * 1e6,
            "fill": fill_s / guided_steps * 1e6,
            "apply": apply_s / guided_steps * 1e6,
            "apply_upload": upload_s / guided_steps * 1e6,
        }
        if guided_steps
        else None,
    }


async def valid_documents(engine: LLMEngine, tokenizer_dir: Path, reqs: list[list[int]]) -> dict:
    """The device path's correctness (the Triton mask kernel, sampling after the masks under
    async scheduling and CUDA graphs): bounded schemas, EOS honoured, every output must parse
    as JSON of the schema's top-level type, its required keys present."""
    tok = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    cases = [(SCHEMAS[i % len(SCHEMAS)][1], p) for i, p in enumerate(reqs)]
    for i, (schema, p) in enumerate(cases):
        guide = Guide(GuideKind.JSON_SCHEMA, json.dumps(schema))
        params = SamplingParams(temperature=1.0, seed=i, max_tokens=256, guide=guide)
        engine.add_request(f"valid-{i}", p, params)
    texts: dict[int, list[int]] = {i: [] for i in range(len(cases))}
    while engine.has_unfinished_requests():
        for out in await engine.step():
            texts[int(out.request_id.rsplit("-", 1)[1])].extend(out.token_ids)
    valid = 0
    for i, (schema, _) in enumerate(cases):
        try:
            doc = json.loads(tok.decode(texts[i], skip_special_tokens=True))
        except ValueError:
            continue
        want = dict if schema.get("type") == "object" else list
        valid += isinstance(doc, want) and all(k in doc for k in schema.get("required", []))
    return {"documents": len(cases), "valid": valid}


def compile_times(tokenizer_dir: Path, vocab: int, eos: list[int]) -> dict:
    compiler = GrammarCompiler(str(tokenizer_dir), vocab, eos)
    start = time.perf_counter()
    compiler.compile_now(Guide(GuideKind.JSON_OBJECT))  # the one-off tokenizer set-up
    setup = time.perf_counter() - start
    cold: list[float] = []
    for _, schema in SCHEMAS:
        g = Guide(GuideKind.JSON_SCHEMA, json.dumps(schema))
        start = time.perf_counter()
        compiler.compile_now(g)
        cold.append(time.perf_counter() - start)
    hits: list[float] = []
    for _, schema in SCHEMAS:
        g = Guide(GuideKind.JSON_SCHEMA, json.dumps(schema))
        start = time.perf_counter()
        assert compiler.lookup(g) is not None
        hits.append(time.perf_counter() - start)
    cold.sort()
    compiler.close()
    return {
        "tokenizer_setup_s": round(setup, 3),
        "compile_ms_p50": round(statistics.median(cold) * 1e3, 3),
        "compile_ms_p99": round(cold[min(len(cold) - 1, int(0.99 * len(cold)))] * 1e3, 3),
        "cache_hit_us_p50": round(statistics.median(hits) * 1e6, 2),
        "cache_hits": compiler.stats.hits,
        "cache_misses": compiler.stats.misses,
    }


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokenizer", type=Path, default=None, help="SmolLM2's tokenizer files")
    ap.add_argument("--model", type=Path, default=None, help="a model dir (default: random 1B)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--mixed-share", type=float, default=0.25)
    ap.add_argument("--tiny", action="store_true", help="CPU smoke run (tiny random model)")
    ap.add_argument(
        "--fill-threads", type=int, default=0, help="the engine's mask fill threads (0: default)"
    )
    args = ap.parse_args()
    device = "cpu" if args.tiny or not torch.cuda.is_available() else "cuda"
    tok_dir = args.tokenizer
    if tok_dir is None:
        from pagemesh.services.executor.model.loader import DEFAULT_MODEL, resolve_model

        tok_dir = resolve_model(DEFAULT_MODEL)
    model_dir = args.model
    if model_dir is None:
        tmp = Path(tempfile.gettempdir(), "pm-structured-tiny" if args.tiny else "rand1b")
        if args.tiny:
            from benchmarks import make_random_model

            make_random_model.ARCH.update(
                hidden_size=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                intermediate_size=128,
            )
        model_dir = make(tmp, tok_dir, device)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model, mconf = load_model(model_dir, device, dtype)
    config = EngineConfig(
        model=str(model_dir),
        device=device,
        dtype=str(dtype).removeprefix("torch."),
        num_blocks=4096 if device == "cpu" else None,
        max_num_seqs=max(256, args.batch),
        gpu_memory_utilization=0.6,
        grammar_fill_threads=args.fill_threads,
    )
    engine = LLMEngine(config, LocalAllocator(), model=model, model_config=mconf)
    await engine.start()
    result: dict = {
        "bench": "structured_output",
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "torch": torch.__version__,
        "params_b": round(sum(p.numel() for p in model.parameters()) / 1e9, 3),
        "batch": args.batch,
        "max_tokens": args.max_tokens,
        "async_scheduling": config.async_scheduling,
    }
    reqs = prompts(tok_dir, args.batch)
    n_mixed = max(1, round(args.batch * args.mixed_share))
    arms = {
        "unconstrained": [False] * args.batch,
        "constrained": [True] * args.batch,
        "mixed": [True] * n_mixed + [False] * (args.batch - n_mixed),
    }
    # Warm-up, each arm at full batch for a few tokens: Triton compiles, the grammar (compiled
    # once, cached from here on), the batch's CUDA graphs, the grammar buffers' sizes.
    for name, guided in arms.items():
        await run_arm(engine, reqs, guided, 16, f"warm-{name}")
    runs: dict[str, list[dict]] = {k: [] for k in arms}
    for r in range(args.rounds):
        for name, guided in arms.items():
            runs[name].append(await run_arm(engine, reqs, guided, args.max_tokens, f"{name}{r}"))
            log(f"round {r} {name}: {runs[name][-1]['tok_s']:.1f} tok/s")

    def med(name: str, key: str) -> float:
        return statistics.median(x[key] for x in runs[name])

    unc = med("unconstrained", "tok_s")
    con = med("constrained", "tok_s")
    mixed_u = med("mixed", "unconstrained_tok_s_per_seq")
    unc_per_seq = med("unconstrained", "unconstrained_tok_s_per_seq")
    result.update(
        unconstrained_tok_s=round(unc, 1),
        constrained_tok_s=round(con, 1),
        constrained_over_unconstrained=round(con / unc, 4),
        mixed_tok_s=round(med("mixed", "tok_s"), 1),
        mixed_unconstrained_per_seq_over_unconstrained=round(mixed_u / unc_per_seq, 4),
        rounds={k: [round(x["tok_s"], 1) for x in v] for k, v in runs.items()},
        # The median round's step time and the guided path's host time per step, us.
        step_us={k: round(statistics.median(x["step_us"] for x in v), 1) for k, v in runs.items()},
        phase_us={
            k: {
                p: round(statistics.median(x["phase_us"][p] for x in v), 1)
                for p in v[0]["phase_us"]
            }
            for k, v in runs.items()
        },
        guided_host_us_per_step={
            k: {
                part: round(statistics.median(x["guided_host_us_per_step"][part] for x in v), 1)
                for part in ("accept", "fill", "apply", "apply_upload")
            }
            for k, v in runs.items()
            if v[0]["guided_host_us_per_step"] is not None
        },
        fill_threads=engine.guided.threads,
        compile=compile_times(tok_dir, mconf.vocab_size, list(mconf.eos_token_ids)),
        bounded_schemas=await valid_documents(engine, tok_dir, reqs),
        engine_grammar_cache={
            "hits": engine.grammars.stats.hits,
            "misses": engine.grammars.stats.misses,
        },
    )
    await engine.close()
    print(json.dumps(result))


if __name__ == "__main__":
    asyncio.run(main())
