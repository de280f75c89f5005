"""LLMEngine with the real SmolLM2 through kvmanager trouble, over the in-process allocator made
unreachable at will (tests/executor/test_ride_through.py's `_cut`):
- an outage in which kvmanager comes back with an older state (lost calls): greedy outputs are
  those of an uninterrupted run, nothing fails, no block leaks;
- an outage past the bound: every request ends with a retryable ERROR, no block leaks once
  kvmanager is back;
- a stale epoch (another registration of its id): the engine re-registers, its running requests
  end retryably, the next request is served."""

from __future__ import annotations

import asyncio
import copy
import time
from pathlib import Path

import pytest
from pagemesh.services.executor.engine import LLMEngine
from pagemesh.services.executor.engine_api import FinishReason

from tests.executor.engine_support import (
    Run,
    assert_all_free_or_cached,
    greedy,
    make_engine,
    run_all,
    tokenizer,
)
from tests.executor.test_ride_through import _cut

pytestmark = pytest.mark.slow  # (a minute and more on a 2-core CPU)

PROMPTS = [
    "The capital of France is",
    "Once upon a time, in a small village by the sea, there lived an old fisherman who",
    "List three uses of a paperclip:",
]
MAX_TOKENS = 40


def _ids(path: Path, text: str) -> list[int]:
    return tokenizer(path)(text)["input_ids"]


def _add_all(engine: LLMEngine, path: Path, tag: str, n: int = MAX_TOKENS) -> None:
    for i, p in enumerate(PROMPTS):
        engine.add_request(f"{tag}{i}", _ids(path, p), greedy(n, ignore_eos=True))


async def _steps(engine: LLMEngine, run: Run, n: int) -> None:
    for _ in range(n):
        run.add(await engine.step())


async def test_outage_with_lost_calls_changes_no_output(smollm2_path: Path) -> None:
    ref_engine = await make_engine(smollm2_path, num_lookahead_tokens=4)
    _add_all(ref_engine, smollm2_path, "r")
    ref = await run_all(ref_engine)

    engine = await make_engine(smollm2_path, num_lookahead_tokens=4)
    alloc = engine.allocator
    down = [False]
    _cut(alloc, down)
    _add_all(engine, smollm2_path, "o")
    run = Run()
    await _steps(engine, run, 4)
    redis_copy = copy.deepcopy(alloc.manager)  # what Redis holds; the next calls get lost
    await _steps(engine, run, 12)
    down[0] = True
    alloc.manager = redis_copy  # kvmanager restarted from its older state
    await _steps(engine, run, 20)
    assert engine.scheduler.link.riding
    down[0] = False
    run_rest = await run_all(engine)
    for o in run_rest.outputs:
        run.add([o])

    for i in range(len(PROMPTS)):
        assert run.finish[(f"o{i}", 0)] == FinishReason.LENGTH
        assert run.tokens[(f"o{i}", 0)] == ref.tokens[(f"r{i}", 0)], f"prompt {i} changed"
    assert not engine.scheduler.link.riding
    assert_all_free_or_cached(engine)


async def test_outage_past_the_bound_fails_retryably_without_a_leak(smollm2_path: Path) -> None:
    engine = await make_engine(smollm2_path, kvmanager_outage_timeout=0.5)
    down = [False]
    _cut(engine.allocator, down)
    _add_all(engine, smollm2_path, "b", n=200)
    run = Run()
    await _steps(engine, run, 3)
    down[0] = True
    cut_at = time.monotonic()
    while len(run.finish) < len(PROMPTS):
        run.add(await engine.step())
        assert time.monotonic() - cut_at < 60, "requests never failed"
    assert time.monotonic() - cut_at >= 0.5, "failed before the bound"
    ends = [o for o in run.outputs if o.finished]
    assert all(o.finish_reason == FinishReason.ERROR and o.retryable for o in ends), ends
    assert all("retry" in o.error and "127.0.0.1" not in o.error for o in ends)

    down[0] = False
    await run_all(engine)  # the reconcile: kvmanager gets the releases
    assert not engine.scheduler.link.riding
    assert_all_free_or_cached(engine)


async def test_stale_epoch_re_registers_and_serves(smollm2_path: Path) -> None:
    engine = await make_engine(smollm2_path)
    alloc = engine.allocator
    _add_all(engine, smollm2_path, "s", n=100)
    run = Run()
    await _steps(engine, run, 3)
    first_epoch = engine.epoch
    ex = alloc.manager.executors[alloc.executor_id]
    # Another process registers this executor's id.
    alloc.manager.register(alloc.executor_id, ex.num_blocks, ex.block_size, "impostor")
    while len(run.finish) < len(PROMPTS):
        run.add(await engine.step())
    ends = [o for o in run.outputs if o.finished]
    assert all(o.finish_reason == FinishReason.ERROR and o.retryable for o in ends), ends
    assert engine.epoch > first_epoch + 1  # past the impostor's

    engine.add_request("next", _ids(smollm2_path, PROMPTS[0]), greedy(8))
    after = await asyncio.wait_for(run_all(engine), 120)
    assert after.finish[("next", 0)] in (FinishReason.STOP, FinishReason.LENGTH)
    assert after.tokens[("next", 0)]
    assert_all_free_or_cached(engine)


async def test_n2_prompt_waits_for_its_fork_through_an_outage(smollm2_path: Path) -> None:
    """An n > 1 request whose prompt is still being prefilled when kvmanager goes: the step that
    would end its prompt (and fork its choices) waits for kvmanager, then both choices run.
    (One whose prompt ends before the link knows of the outage fails retryably: the fork
    cannot be made.)"""
    prompt = _ids(smollm2_path, " ".join(PROMPTS) * 3)
    ref_engine = await make_engine(smollm2_path)
    ref_engine.add_request("ref", prompt, greedy(12))
    ref = await run_all(ref_engine)

    engine = await make_engine(smollm2_path, max_num_batched_tokens=32, max_num_seqs=4)
    down = [False]
    _cut(engine.allocator, down)
    engine.add_request("n2", prompt, greedy(12, n=2))
    run = Run()
    await _steps(engine, run, 1)  # the first chunk: its blocks are held, the rest is not
    down[0] = True
    # What the gRPC client reports when its Session stream breaks: the link knows of the
    # outage before any call fails (the next step's prompt chunk ends the prompt).
    engine.allocator.connection_losses = 1
    await _steps(engine, run, 6)
    assert not run.outputs, "the prompt ended (a fork) while kvmanager was unreachable"
    down[0] = False
    rest = await run_all(engine)
    for o in rest.outputs:
        run.add([o])
    for i in range(2):
        assert run.finish[("n2", i)] == FinishReason.LENGTH
        assert run.tokens[("n2", i)] == ref.tokens[("ref", 0)]
    assert_all_free_or_cached(engine)
