"""The serving benchmark's client pool against a real mesh (SmolLM2 on CPU): a shared-prefix
burst sent from two client processes is measured as the single-process client measured it; the
gateway's and the executor's traces of the run (--trace-requests, --trace-steps; the executor
in async scheduling, the GPU's step order) agree."""

from __future__ import annotations

import json
import random
from pathlib import Path

from pagemesh.services.gateway.chat import Tokenizer

from benchmarks import workloads
from benchmarks.load_client import ClientPool
from benchmarks.serve_bench import offline_engine_tok_s, run_workload
from benchmarks.workloads import Conversation, Turn
from tests.support.mesh import Mesh, MeshConfig

MODEL = "bench"
BLOCK_SIZE = 16


def shared_prefix(tokenizer: Tokenizer, count: int) -> list[Conversation]:
    """workloads' shared_prefix, scaled down for a CPU: a 64-token system prompt, short
    questions, 4 output tokens."""
    rng = random.Random(0)
    words = workloads.single_token_words(tokenizer.hf)
    system = workloads.text_of(words, rng, 64)
    return [
        Conversation([Turn(workloads.text_of(words, rng, rng.randint(8, 24)), 4)], system=system)
        for _ in range(count)
    ]


async def test_two_client_processes_share_a_burst(smollm2_path: Path, tmp_path: Path) -> None:
    tokenizer = Tokenizer.load(str(smollm2_path))
    convs = shared_prefix(tokenizer, 5)
    gw_trace, ex_trace = tmp_path / "gateway.jsonl", tmp_path / "executor.jsonl"
    config = MeshConfig(
        model=str(smollm2_path),
        model_name=MODEL,
        gateway_args=["--trace-requests", str(gw_trace)],
        # The GPU's step order (async scheduling) on the CPU: what the traces look like there.
        executor_args=["--trace-steps", str(ex_trace), "--scheduling", "async"],
    )
    with Mesh(tmp_path, config) as mesh, ClientPool(2) as clients:
        report = await run_workload(
            mesh.url,
            mesh.kv_address,
            MODEL,
            "shared_prefix",
            convs,
            float("inf"),
            tokenizer,
            BLOCK_SIZE,
            warmup_first=True,
            executor_address=mesh.executor_address,
            clients=clients,
        )
    assert report["requests"] == 5
    assert report["failed"] == 0, report["errors"]
    # Of 5 TTFTs the 10th percentile is the smallest: every request saw a first token.
    assert report["ttft_s"]["p10"] > 0
    # The warm-up conversation ran alone from the parent; the other 4 were dealt round-robin.
    assert report["client_requests_per_proc"] == [2, 2]
    assert report["theoretical_hit_rate"] > 0
    assert report["measured_hit_rate"] == report["theoretical_hit_rate"]
    assert 0 < report["client_cpu_fraction_max"] <= report["client_cpu_fraction"]

    # Both traces hold the 5 requests under the gateway's request ids, each request's marks in
    # order across the two processes (one clock: CLOCK_MONOTONIC).
    gw = {r["rid"]: r for r in map(json.loads, gw_trace.read_text().splitlines())}
    events = [json.loads(line) for line in ex_trace.read_text().splitlines()]
    arrive = {e["rid"]: e["t"] for e in events if e["ev"] == "arrive"}
    first = {e["rid"]: e["t"] for e in events if e["ev"] == "first"}
    assert len(gw) == 5 and set(gw) == set(arrive) == set(first)
    for rid, r in gw.items():
        marks = [r["entry"], r["parsed"], r["encoded"], r["submitted"], arrive[rid]]
        marks += [first[rid], r["first_step"], r["first_write"]]
        assert marks == sorted(marks), (rid, marks)
    assert sum(e["ev"] == "first" for e in events) == 5  # one each, however short the request
    # Each request is admitted by exactly one step, which begins after it arrived; with async
    # scheduling its first output comes out of the next step call, after the admitting one's
    # line (benchmarks/ttft_breakdown.py reads the admission from it).
    admitting = [
        (rid, e) for e in events if e["ev"] == "step" for rid in e.get("admitted_rids", ())
    ]
    assert sorted(rid for rid, _ in admitting) == sorted(gw)
    for rid, step in admitting:
        assert arrive[rid] <= step["t"] <= step["end"] < first[rid], (rid, step)
        assert step["admitted"] == len(step["admitted_rids"])


async def test_offline_engine_times_each_repetition(smollm2_path: Path) -> None:
    """The offline figure is made per mixed repetition, on that repetition's own prompts, in
    order: the suite pairs mesh repetition k with offline repetition k."""
    rng = random.Random(1)

    def request() -> tuple[list[int], int]:
        return [rng.randrange(1, 49_000) for _ in range(rng.randint(8, 40))], rng.randint(2, 9)

    runs = [[request() for _ in range(2)] for _ in range(3)]
    expected = [sum(mt for _, mt in r) for r in runs]
    assert len(set(expected)) == 3  # repetitions told apart by their counts alone
    figures = await offline_engine_tok_s(str(smollm2_path), runs, "cpu")
    assert [f["rep"] for f in figures] == [0, 1, 2]
    # EOS ignored: every request makes exactly its max_tokens, so each repetition's count is its
    # own workload's, not another's.
    assert [f["output_tokens"] for f in figures] == expected
    assert all(f["output_tokens_per_s"] > 0 for f in figures)
