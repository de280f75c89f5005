"""Admission allocates a round of waiting sequences together (pipelined). When a later sequence
gets its blocks but an earlier one does not fit, the later one must not overtake it (FIFO) and
its blocks go back: every block ends free or cached, and the outputs equal transformers'."""

from __future__ import annotations

from pathlib import Path

from pagemesh.services.executor.engine_api import SamplingParams

from tests.executor.engine_support import (
    assert_all_free_or_cached,
    hf_greedy,
    make_engine,
    run_all,
)


async def test_fifo_admission_gives_back_blocks_allocated_out_of_turn(smollm2_path: Path) -> None:
    # 12 blocks of 16 tokens. "big" holds 6 blocks while it runs; "huge" needs 8 and must wait
    # for it; "small" (1 block) would fit beside "big" but arrives after "huge".
    engine = await make_engine(smollm2_path, num_blocks=12, num_lookahead_tokens=0)
    prompts = {"big": [1000 + i for i in range(90)], "huge": [2000 + i for i in range(120)]}
    prompts["small"] = [3000 + i for i in range(10)]
    for rid in ("big", "huge", "small"):
        engine.add_request(rid, prompts[rid], SamplingParams(temperature=0.0, max_tokens=4))
    order: list[str] = []

    def on_step(e) -> None:
        for seq in e.scheduler.running:
            if seq.request.request_id not in order:
                order.append(seq.request.request_id)

    run = await run_all(engine, on_step=on_step)
    assert order == ["big", "huge", "small"], order
    for rid, ids in prompts.items():
        assert run.tokens[(rid, 0)] == hf_greedy(smollm2_path, tuple(ids), 4), rid
    assert_all_free_or_cached(engine)
