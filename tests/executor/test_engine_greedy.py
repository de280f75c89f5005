"""LLMEngine on CPU with the real SmolLM2-135M-Instruct and the in-process allocator: greedy
outputs are token-identical to transformers' `generate`, cold, with a prefix hit, under
preemption and with n > 1; every block ends free or cached."""

from __future__ import annotations

from pathlib import Path

import pytest
from pagemesh.services.executor.engine import LLMEngine
from pagemesh.services.executor.engine_api import FinishReason

from tests.executor.engine_support import (
    Run,
    assert_all_free_or_cached,
    blocks_in_use,
    greedy,
    hf_greedy,
    make_engine,
    run_all,
    tokenizer,
)

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "Once upon a time, in a small village by the sea, there lived an old fisherman who",
    "List three uses of a paperclip:",
]
LENGTHS = [8, 28, 16, 21]
SYSTEM = (
    "You are a careful assistant. Answer briefly and precisely, cite no sources, and never "
    "invent facts. When a question is ambiguous, say which reading you chose and why. Keep "
    "code examples short and runnable, in Python unless told otherwise. "
)


def _ids(path: Path, text: str) -> list[int]:
    return tokenizer(path)(text)["input_ids"]


async def test_greedy_cold_equals_transformers(smollm2_path: Path) -> None:
    engine = await make_engine(smollm2_path)
    prompts = [_ids(smollm2_path, p) for p in PROMPTS]
    for i, (prompt, n) in enumerate(zip(prompts, LENGTHS, strict=True)):
        engine.add_request(f"r{i}", prompt, greedy(n))
    run = await run_all(engine)
    for i, (prompt, n) in enumerate(zip(prompts, LENGTHS, strict=True)):
        ref = hf_greedy(smollm2_path, tuple(prompt), n)
        assert run.tokens[(f"r{i}", 0)] == ref, PROMPTS[i]
        assert run.finish[(f"r{i}", 0)] in (FinishReason.LENGTH, FinishReason.STOP)
    assert_all_free_or_cached(engine)


async def test_chunked_prefill_equals_transformers(smollm2_path: Path) -> None:
    # A 40-token budget splits the prompts into chunks mixed with other sequences' decodes.
    engine = await make_engine(smollm2_path, max_num_batched_tokens=40, max_num_seqs=4)
    prompts = [_ids(smollm2_path, SYSTEM + p) for p in PROMPTS[:3]]
    for i, prompt in enumerate(prompts):
        engine.add_request(f"c{i}", prompt, greedy(12))
    run = await run_all(engine)
    for i, prompt in enumerate(prompts):
        assert run.tokens[(f"c{i}", 0)] == hf_greedy(smollm2_path, tuple(prompt), 12)
    assert_all_free_or_cached(engine)


async def test_prefix_hit_equals_cold(smollm2_path: Path) -> None:
    """Request b comes right after a's last token, before the engine has told kvmanager that a
    ended (the step that ends the last request returns its outputs first): b's admission call
    carries a's commits and release, so b hits a's blocks in one round trip. Once b ends with
    nothing after it, the next step() settles with kvmanager and the engine is idle."""
    engine = await make_engine(smollm2_path)
    calls = _record_step_calls(engine)
    ex = engine.allocator.manager.executors[engine.allocator.executor_id]
    first = _ids(smollm2_path, SYSTEM + "What is a prime number?")
    second = _ids(smollm2_path, SYSTEM + "Name a famous bridge.")
    engine.add_request("a", first, greedy(16))
    await _until_finished(engine, "a")
    assert "a" in ex.seqs and engine.has_unfinished_requests()  # the release waits
    engine.add_request("b", second, greedy(16))
    run = await _until_finished(engine, "b")
    cached = {o.num_cached_tokens for o in run.outputs}
    assert len(cached) == 1 and cached.pop() >= 48, "the shared prefix must be served cached"
    assert run.tokens[("b", 0)] == hf_greedy(smollm2_path, tuple(second), 16)
    released_a = [i for i, (releases, _) in enumerate(calls) if "a" in releases]
    admitted_b = [i for i, (_, admits) in enumerate(calls) if "b" in admits]
    assert released_a == admitted_b, calls  # one call: a's release, then b's admission
    assert "b" in ex.seqs and engine.has_unfinished_requests()
    assert await engine.step() == []  # no request comes: the owed release goes now
    assert not engine.has_unfinished_requests()
    assert_all_free_or_cached(engine)


def _record_step_calls(engine: LLMEngine) -> list[tuple[list[str], list[str]]]:
    """(releases, admitted sequence ids) of every Step call the engine makes from now on."""
    calls: list[tuple[list[str], list[str]]] = []
    real = engine.allocator.step

    async def step(commits, releases, extends, admits=None, budget=0, *, load=None):
        calls.append((list(releases), [a.seq_id for a in admits or []]))
        return await real(commits, releases, extends, admits, budget, load=load)

    engine.allocator.step = step
    return calls


async def _until_finished(engine: LLMEngine, rid: str) -> Run:
    """Steps until request `rid`'s final output, and not one step more."""
    run = Run()
    for _ in range(1000):
        run.add(await engine.step())
        if (rid, 0) in run.finish:
            return run
    raise AssertionError(f"{rid} did not finish")


async def test_preemption_recompute_equals_transformers(smollm2_path: Path) -> None:
    # 4 sequences of ~20-35 + 28 tokens need ~16 blocks together; the pool has 10.
    engine = await make_engine(smollm2_path, num_blocks=10, num_lookahead_tokens=0)
    prompts = [_ids(smollm2_path, p + " Explain in detail, step by step:") for p in PROMPTS]
    for i, prompt in enumerate(prompts):
        engine.add_request(f"p{i}", prompt, greedy(28))
    run = await run_all(engine)
    assert engine.scheduler.num_preemptions > 0
    for i, prompt in enumerate(prompts):
        assert run.tokens[(f"p{i}", 0)] == hf_greedy(smollm2_path, tuple(prompt), 28)
    assert_all_free_or_cached(engine)


async def test_parallel_sampling_greedy_and_memory(smollm2_path: Path) -> None:
    prompt = _ids(smollm2_path, SYSTEM + "Write a haiku about the sea.")
    max_tokens = 20
    ref = hf_greedy(smollm2_path, tuple(prompt), max_tokens)

    engine = await make_engine(smollm2_path, num_lookahead_tokens=0)
    peak = [0]

    def track(e) -> None:
        peak[0] = max(peak[0], blocks_in_use(e))

    engine.add_request("n4", prompt, greedy(max_tokens, n=4))
    run = await run_all(engine, on_step=track)
    for i in range(4):
        assert run.tokens[("n4", i)] == ref, f"choice {i}"
    assert {o.index for o in run.outputs if o.finished} == {0, 1, 2, 3}
    assert_all_free_or_cached(engine)
    shared_peak = peak[0]

    # Four independent requests (different salts: no prefix sharing between them).
    engine = await make_engine(smollm2_path, num_lookahead_tokens=0)
    peak[0] = 0
    for i in range(4):
        engine.add_request(f"solo{i}", prompt, greedy(max_tokens), cache_salt=f"tenant{i}")
    run = await run_all(engine, on_step=track)
    for i in range(4):
        assert run.tokens[(f"solo{i}", 0)] == ref
    saved = 1 - shared_peak / peak[0]
    print(f"n=4 peak blocks: {shared_peak} shared vs {peak[0]} independent: {saved:.1%} saved")
    assert saved > 0.3


async def test_abort_releases_blocks(smollm2_path: Path) -> None:
    engine = await make_engine(smollm2_path)
    engine.add_request("x", _ids(smollm2_path, PROMPTS[2]), greedy(50, n=2))
    engine.add_request("y", _ids(smollm2_path, PROMPTS[0]), greedy(50))
    for _ in range(3):
        await engine.step()
    engine.abort_request("x")
    outputs = await engine.step()
    aborted = [o for o in outputs if o.request_id == "x"]
    assert sorted(o.index for o in aborted) == [0, 1]
    assert all(o.finish_reason == FinishReason.ABORT for o in aborted)
    engine.abort_request("y")
    await run_all(engine)
    assert_all_free_or_cached(engine)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"temperature": -1.0}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_k": -5}, "top_k"),
        ({"min_p": 1.5}, "min_p"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": 10**6}, "context length"),
        ({"n": 0}, "n must be"),
        ({"n": 1000}, "n must be"),
        ({"presence_penalty": 3.0}, "presence_penalty"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"logprobs": 100}, "logprobs"),
        ({"use_beam_search": True}, "beam_width must be"),
        ({"stop_token_ids": [10**9]}, "stop_token_ids"),
    ],
)
async def test_bad_params_raise(smollm2_path: Path, kwargs: dict, match: str) -> None:
    engine = await _shared_engine(smollm2_path)
    params = greedy(4)
    for k, v in kwargs.items():
        setattr(params, k, v)
    with pytest.raises(ValueError, match=match):
        engine.add_request("bad", [1, 2, 3], params)
    assert not engine.has_unfinished_requests()


async def test_bad_prompts_raise(smollm2_path: Path) -> None:
    engine = await _shared_engine(smollm2_path)
    with pytest.raises(ValueError, match="at least one token"):
        engine.add_request("e", [], greedy(4))
    for bad in ([10**8], [5, -1], [2**70]):
        with pytest.raises(ValueError, match="prompt token ids"):
            engine.add_request("e", bad, greedy(4))
    with pytest.raises(ValueError, match="integers"):
        engine.add_request("e", [1, 2.5], greedy(4))  # never truncated to 2
    engine.add_request("dup", [1, 2], greedy(1))
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request("dup", [1, 2], greedy(1))
    await run_all(engine)


_ENGINES: dict[Path, object] = {}


async def _shared_engine(path: Path):
    if path not in _ENGINES:
        _ENGINES[path] = await make_engine(path, num_blocks=64)
    return _ENGINES[path]


async def test_async_scheduling_equals_transformers(smollm2_path: Path) -> None:
    # The CUDA default, run on CPU: launch step t before landing t-1, under preemption, with
    # n > 1; the tokens must not change.
    engine = await make_engine(
        smollm2_path, num_blocks=10, num_lookahead_tokens=0, async_scheduling=True
    )
    prompts = [_ids(smollm2_path, p + " Explain in detail, step by step:") for p in PROMPTS]
    for i, prompt in enumerate(prompts[:3]):
        engine.add_request(f"p{i}", prompt, greedy(28))
    engine.add_request("n2", prompts[3], greedy(28, n=2))
    run = await run_all(engine)
    assert engine.scheduler.num_preemptions > 0
    for i, prompt in enumerate(prompts[:3]):
        assert run.tokens[(f"p{i}", 0)] == hf_greedy(smollm2_path, tuple(prompt), 28)
    ref = hf_greedy(smollm2_path, tuple(prompts[3]), 28)
    assert run.tokens[("n2", 0)] == ref and run.tokens[("n2", 1)] == ref
    assert_all_free_or_cached(engine)
