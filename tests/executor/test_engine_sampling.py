"""Sampling through the whole engine (SmolLM2 on CPU): seeds reproduce, stop ids stop,
logprobs come back, penalties and n > 1 with sampling run, a single choice can be cut."""

from __future__ import annotations

from pathlib import Path

import pytest
from pagemesh.services.executor.engine_api import FinishReason, SamplingParams

from tests.executor.engine_support import (
    Run,
    assert_all_free_or_cached,
    greedy,
    hf_greedy,
    make_engine,
    run_all,
    tokenizer,
)

PROMPT = "Write a short poem about autumn leaves:"
OTHER = "The three primary colors are"


def _sampled(seed: int | None, n: int = 1, max_tokens: int = 12) -> SamplingParams:
    return SamplingParams(
        temperature=1.0, top_p=0.95, top_k=50, seed=seed, n=n, max_tokens=max_tokens
    )


async def test_seeded_sampling_reproducible(smollm2_path: Path) -> None:
    ids = tokenizer(smollm2_path)(PROMPT)["input_ids"]
    other = tokenizer(smollm2_path)(OTHER)["input_ids"]
    # Alone, then again in a batch with different neighbours: same seed, same tokens.
    engine = await make_engine(smollm2_path)
    engine.add_request("a", ids, _sampled(1234))
    engine.add_request("b", ids, _sampled(99))
    first = await run_all(engine)
    engine = await make_engine(smollm2_path)
    engine.add_request("x", other, _sampled(None))
    engine.add_request("a", ids, _sampled(1234))
    engine.add_request("y", other, greedy(5))
    second = await run_all(engine)
    assert first.tokens[("a", 0)] == second.tokens[("a", 0)]
    assert len(first.tokens[("a", 0)]) == 12
    assert first.tokens[("a", 0)] != first.tokens[("b", 0)], "different seeds, same 12 tokens"
    assert_all_free_or_cached(engine)


async def test_a_seeded_continuation_samples_what_the_uninterrupted_run_did(
    smollm2_path: Path,
) -> None:
    """What a migrated request sends (the prompt plus the k tokens made, seed_position k, the
    rest of max_tokens) draws the uninterrupted run's tokens from k on, also after preemption
    (a recompute keeps its positions) and with async scheduling (placeholders in flight)."""
    ids = tokenizer(smollm2_path)(PROMPT)["input_ids"]
    other = tokenizer(smollm2_path)(OTHER)["input_ids"]
    engine = await make_engine(smollm2_path)
    engine.add_request("whole", ids, _sampled(1234, max_tokens=16))
    whole = (await run_all(engine)).tokens[("whole", 0)]
    assert len(whole) == 16
    # Continuations at two seams, beside unseeded and greedy neighbours, in a pool small enough
    # to preempt, steps launched before the previous one lands.
    engine = await make_engine(
        smollm2_path, num_blocks=5, num_lookahead_tokens=0, async_scheduling=True
    )
    for k in (5, 11):
        params = _sampled(1234, max_tokens=16 - k)
        params.seed_position = k
        engine.add_request(f"from{k}", ids + whole[:k], params)
    engine.add_request("x", other, _sampled(None, max_tokens=16))
    engine.add_request("y", other + ids, greedy(16))
    run = await run_all(engine)
    assert engine.scheduler.num_preemptions > 0
    for k in (5, 11):
        assert run.tokens[(f"from{k}", 0)] == whole[k:], f"resumed at {k}"
    # Without the position it is the stream's start again: a different sample.
    engine.add_request("restart", ids + whole[:5], _sampled(1234, max_tokens=11))
    assert (await run_all(engine)).tokens[("restart", 0)] != whole[5:]
    assert_all_free_or_cached(engine)


async def test_a_continuation_keeps_counting_penalties_over_the_seam(smollm2_path: Path) -> None:
    """Presence and frequency penalties count the tokens made before a migration's seam as
    output (seed_position says how many of the prompt's last tokens they are): a greedy
    continuation with penalties makes the uninterrupted run's tokens. Counted as prompt instead
    (seed_position 0), the same continuation goes elsewhere."""
    ids = tokenizer(smollm2_path)(PROMPT)["input_ids"]
    penalties = dict(presence_penalty=1.5, frequency_penalty=1.5, ignore_eos=True)
    engine = await make_engine(smollm2_path)
    engine.add_request("whole", ids, greedy(24, **penalties))
    whole = (await run_all(engine)).tokens[("whole", 0)]
    k = 12
    params = greedy(24 - k, **penalties)
    params.seed_position = k
    engine.add_request("cont", ids + whole[:k], params)
    engine.add_request("as_prompt", ids + whole[:k], greedy(24 - k, **penalties))
    run = await run_all(engine)
    assert run.tokens[("cont", 0)] == whole[k:]
    assert run.tokens[("as_prompt", 0)] != whole[k:], "the penalties never touched the seam"
    assert_all_free_or_cached(engine)


async def test_parallel_sampling_with_seed(smollm2_path: Path) -> None:
    ids = tokenizer(smollm2_path)(PROMPT)["input_ids"]
    runs = []
    for _ in range(2):
        engine = await make_engine(smollm2_path)
        engine.add_request("n3", ids, _sampled(7, n=3, max_tokens=10))
        runs.append(await run_all(engine))
        assert_all_free_or_cached(engine)
    choices = [tuple(runs[0].tokens[("n3", i)]) for i in range(3)]
    assert choices == [tuple(runs[1].tokens[("n3", i)]) for i in range(3)]
    assert len(set(choices)) > 1, "children sample independently"


async def test_stop_token_and_logprobs(smollm2_path: Path) -> None:
    ids = tokenizer(smollm2_path)(OTHER)["input_ids"]
    ref = hf_greedy(smollm2_path, tuple(ids), 8)
    stop = ref[4]
    cut = ref.index(stop) + 1
    engine = await make_engine(smollm2_path)
    engine.add_request("s", ids, greedy(8, stop_token_ids=[stop], logprobs=3, return_logprobs=True))
    run = await run_all(engine)
    assert run.tokens[("s", 0)] == ref[:cut]
    assert run.finish[("s", 0)] == FinishReason.STOP
    lps = [lp for o in run.outputs for lp in o.logprobs]
    assert len(lps) == cut
    for lp, token in zip(lps, ref[:cut], strict=True):
        assert lp.token_id == token and lp.logprob <= 0.0
        assert len(lp.top) == 3 and lp.top[0][0] == token  # greedy: the top-1
        assert abs(lp.top[0][1] - lp.logprob) < 1e-5


async def test_penalties_are_deterministic(smollm2_path: Path) -> None:
    ids = tokenizer(smollm2_path)(PROMPT)["input_ids"]
    params = greedy(12, repetition_penalty=1.3, presence_penalty=0.5, frequency_penalty=0.5)
    outs = []
    for _ in range(2):
        engine = await make_engine(smollm2_path)
        engine.add_request("p", ids, params)
        outs.append((await run_all(engine)).tokens[("p", 0)])
    assert outs[0] == outs[1] and len(outs[0]) == 12
    # the penalised greedy output never repeats a token more than a plain greedy one does
    plain = hf_greedy(smollm2_path, tuple(ids), 12)
    assert len(set(outs[0])) >= len(set(plain))


@pytest.mark.parametrize("async_scheduling", [False, True])
async def test_abort_one_choice_the_others_go_on(
    smollm2_path: Path, async_scheduling: bool
) -> None:
    """A choice cut alone (the gateway met a stop string in it) ends with one ABORT output, its
    sequence stops taking steps and gives its blocks back at once, and its siblings run to their
    own end with the tokens they would have had anyway."""
    ids = tokenizer(smollm2_path)(PROMPT)["input_ids"]
    params = _sampled(11, n=3, max_tokens=24)
    engine = await make_engine(smollm2_path, async_scheduling=async_scheduling)
    engine.add_request("ref", ids, params)
    ref = await run_all(engine)

    engine = await make_engine(smollm2_path, async_scheduling=async_scheduling)
    engine.add_request("n3", ids, params)
    run = Run()
    while len(run.tokens[("n3", 1)]) < 4:
        run.add(await engine.step())
    engine.abort_choices("n3", [1, 7])  # 7: no such choice, ignored
    engine.abort_choices("nope", [0])  # no such request, ignored
    outputs = await engine.step()
    run.add(outputs)
    cut = [o for o in outputs if o.index == 1 and o.finished]
    assert [o.finish_reason for o in cut] == [FinishReason.ABORT]
    assert engine.num_running == 2  # the cut sequence takes no further step
    # Its table is released at kvmanager now, not when the request ends.
    await engine.scheduler.drain()
    ex = engine.allocator.manager.executors[engine.allocator.executor_id]
    assert len(ex.seqs) == 2
    run.add((await run_all(engine)).outputs)
    for i in (0, 2):
        assert run.finish[("n3", i)] == FinishReason.LENGTH
        assert run.tokens[("n3", i)] == ref.tokens[("ref", i)]
    assert run.finish[("n3", 1)] == FinishReason.ABORT
    assert run.tokens[("n3", 1)] == ref.tokens[("ref", 1)][: len(run.tokens[("n3", 1)])]
    assert len(run.tokens[("n3", 1)]) < 24
    assert_all_free_or_cached(engine)


async def test_abort_after_a_cut_choice_ends_the_rest_once(smollm2_path: Path) -> None:
    ids = tokenizer(smollm2_path)(PROMPT)["input_ids"]
    engine = await make_engine(smollm2_path)
    engine.add_request("n2", ids, _sampled(3, n=2, max_tokens=30))
    run = Run()
    while len(run.tokens[("n2", 0)]) < 2:
        run.add(await engine.step())
    engine.abort_choices("n2", [0])
    run.add(await engine.step())
    engine.abort_request("n2")
    # Run.add fails on any output after a choice's end: choice 0 must not end twice.
    run.add((await run_all(engine)).outputs)
    assert run.finish == {("n2", 0): FinishReason.ABORT, ("n2", 1): FinishReason.ABORT}
    assert not engine.requests
    assert_all_free_or_cached(engine)


async def test_logit_bias_bans_and_forces_tokens(smollm2_path: Path) -> None:
    """Greedy with the first greedy token banned gives another first token; a token biased by
    +100 is chosen at every step; a request beside them is untouched."""
    ids = tokenizer(smollm2_path)(OTHER)["input_ids"]
    ref = hf_greedy(smollm2_path, tuple(ids), 6)
    engine = await make_engine(smollm2_path)
    engine.add_request("ban", ids, greedy(6, logit_bias={ref[0]: -100.0}))
    engine.add_request("force", ids, greedy(4, logit_bias={42: 100.0}))
    engine.add_request("plain", ids, greedy(6))
    run = await run_all(engine)
    assert run.tokens[("ban", 0)][0] != ref[0]
    assert ref[0] not in run.tokens[("ban", 0)]
    assert run.tokens[("force", 0)] == [42] * 4
    assert run.tokens[("plain", 0)] == ref
    assert_all_free_or_cached(engine)


@pytest.mark.parametrize(
    ("bias", "match"), [({10**6: 1.0}, "token ids"), ({5: 200.0}, r"\[-100, 100\]")]
)
async def test_bad_logit_bias_is_refused(smollm2_path: Path, bias: dict, match: str) -> None:
    engine = await make_engine(smollm2_path)
    with pytest.raises(ValueError, match=match):
        engine.add_request("x", [1, 2, 3], greedy(2, logit_bias=bias))
