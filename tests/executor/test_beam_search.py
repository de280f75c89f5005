"""Beam search in LLMEngine on CPU with the real SmolLM2-135M-Instruct and the in-process
allocator: the returned beams equal transformers' own `generate(num_beams=k, do_sample=False)`
(same length penalty, early stopping, num_return_sequences), beams share blocks through the
allocator (fork, copy-on-write, release), the search survives preemption and a split token
budget, every block ends free or cached, and bad parameters are refused."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import pytest
import torch
from pagemesh.services.executor.beam_search import BeamSearch
from pagemesh.services.executor.engine_api import FinishReason, SamplingParams

from tests.executor.engine_support import (
    assert_all_free_or_cached,
    greedy,
    hf_greedy,
    hf_model,
    make_engine,
    run_all,
    tokenizer,
)

EOS = 2
MAX_NEW = 16
# (prompt, chat?, width, n, length_penalty, early_stopping): plain prompts run to the length
# limit, chat prompts mostly end on EOS, so both ways hypotheses finish are covered.
CASES = [
    ("The capital of France is", False, 2, 2, 1.0, False),
    ("def fibonacci(n):\n    ", False, 4, 2, 1.0, False),
    ("List three uses of a paperclip:", False, 8, 3, 0.5, True),
    ("Say hi.", True, 4, 4, 2.0, "never"),
    ("What is the capital of France? Answer in one word.", True, 8, 2, 1.0, False),
    ("Is 7 a prime number? Answer yes or no.", True, 2, 1, -0.5, True),
]


def _ids(path: Path, text: str, chat: bool) -> list[int]:
    tok = tokenizer(path)
    if not chat:
        return tok(text)["input_ids"]
    ids = tok.apply_chat_template(
        [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True
    )
    return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)


def _params(width: int, n: int, lp: float, es: bool | str, **kw) -> SamplingParams:
    return SamplingParams(
        n=n,
        temperature=0.0,
        max_tokens=kw.pop("max_tokens", MAX_NEW),
        use_beam_search=True,
        beam_width=width,
        length_penalty=lp,
        early_stopping=es,
        **kw,
    )


@functools.cache
def hf_beams(
    path: Path, prompt: tuple[int, ...], width: int, n: int, lp: float, es: bool | str
) -> tuple[list[list[int]], list[float]]:
    """transformers' beams (best first, each cut after its EOS) and their scores."""
    with torch.inference_mode():
        out = hf_model(path).generate(
            torch.tensor([prompt]),
            max_new_tokens=MAX_NEW,
            do_sample=False,
            num_beams=width,
            num_return_sequences=n,
            length_penalty=lp,
            early_stopping=es,
            return_dict_in_generate=True,
            output_scores=True,
        )
    beams = []
    for row in out.sequences[:, len(prompt) :].tolist():
        beams.append(row[: row.index(EOS) + 1] if EOS in row else row)
    return beams, out.sequences_scores.tolist()


def _check_against_hf(path: Path, run, rid: str, prompt: list[int], case: tuple) -> None:
    _, _, width, n, lp, es = case
    beams, scores = hf_beams(path, tuple(prompt), width, n, lp, es)
    outs = sorted(
        (o for o in run.outputs if o.request_id == rid and o.finished), key=lambda o: o.index
    )
    assert [o.index for o in outs] == list(range(n)), "one final output per returned beam"
    for rank, (o, ref, score) in enumerate(zip(outs, beams, scores, strict=True)):
        assert o.token_ids == ref, f"{rid} beam {rank}: {o.token_ids} != transformers' {ref}"
        want = FinishReason.STOP if ref[-1] == EOS else FinishReason.LENGTH
        assert o.finish_reason == want
        ours = o.cumulative_logprob / len(o.token_ids) ** lp
        assert ours == pytest.approx(score, abs=1e-4), f"{rid} beam {rank} score"


class Watch:
    """Wraps the allocator: counts forks, copy-on-write copies and releases; after every call,
    samples the blocks held (ref > 0) against the blocks the same tables would hold unshared."""

    def __init__(self, engine) -> None:
        self.engine = engine
        alloc = engine.allocator
        self.forks = self.copies = self.releases = 0
        self.peak_held = self.peak_unshared = 0
        self.max_ref = 0
        for name in ("allocate", "extend", "fork", "release", "commit"):
            setattr(alloc, name, self._wrap(name, getattr(alloc, name)))

    def _wrap(self, name, fn):
        async def call(*args, **kwargs):
            result = await fn(*args, **kwargs)
            if name == "fork":
                self.forks += 1
            elif name == "extend":
                self.copies += len(result.copies)
            elif name == "release":
                self.releases += len(args[0])
            self.sample()
            return result

        return call

    def sample(self) -> None:
        alloc = self.engine.allocator
        ex = alloc.manager.executors[alloc.executor_id]
        self.peak_held = max(self.peak_held, sum(1 for r in ex.pool.ref if r > 0))
        self.peak_unshared = max(self.peak_unshared, sum(len(s.blocks) for s in ex.seqs.values()))
        self.max_ref = max(self.max_ref, max(ex.pool.ref))


async def test_beam_search_equals_transformers(smollm2_path: Path) -> None:
    """All cases in one continuous batch, next to a greedy request that must be unaffected."""
    engine = await make_engine(smollm2_path)
    watch = Watch(engine)
    prompts = [_ids(smollm2_path, c[0], c[1]) for c in CASES]
    for i, (prompt, case) in enumerate(zip(prompts, CASES, strict=True)):
        engine.add_request(f"b{i}", prompt, _params(*case[2:]))
    plain = _ids(smollm2_path, "Once upon a time, in a small village by the sea,", False)
    engine.add_request("greedy", plain, greedy(MAX_NEW))
    mixed = []
    run = await run_all(engine, on_step=lambda e: mixed.append(len(e.scheduler.running)))
    for i, (prompt, case) in enumerate(zip(prompts, CASES, strict=True)):
        _check_against_hf(smollm2_path, run, f"b{i}", prompt, case)
    assert run.tokens[("greedy", 0)] == hf_greedy(smollm2_path, tuple(plain), MAX_NEW)
    # Beams share blocks in kvmanager: forks took references, diverging writes copied.
    assert watch.forks > 0 and watch.copies > 0 and watch.releases > 0
    assert watch.max_ref > 1
    assert watch.peak_held < watch.peak_unshared
    assert max(mixed) > 10, "the beams ran in one batch with the other requests"
    assert_all_free_or_cached(engine)


async def test_beam_search_under_preemption_and_split_budget(smollm2_path: Path) -> None:
    """A pool too small for all beams (preemption: parked beams wait for recomputed siblings)
    and a token budget that splits a request's beams across steps: same beams as transformers."""
    picked = [CASES[1], CASES[4], CASES[3]]
    prompts = [_ids(smollm2_path, c[0], c[1]) for c in picked]
    for kwargs in ({"num_blocks": 20}, {"max_num_batched_tokens": 24, "max_num_seqs": 24}):
        engine = await make_engine(smollm2_path, **kwargs)
        parked = []

        def on_step(e, parked=parked) -> None:
            for req in e.requests.values():
                st = req.beam
                if st is not None and 0 < len(st.reports) < len(st.beams):
                    parked.append(req.request_id)

        for i, (prompt, case) in enumerate(zip(prompts, picked, strict=True)):
            engine.add_request(f"p{i}", prompt, _params(*case[2:]))
        if "max_num_batched_tokens" in kwargs:
            # A long prefill eats most of the budget next to the beams' decodes.
            engine.add_request("long", _ids(smollm2_path, "word " * 120, False), greedy(4))
        run = await run_all(engine, on_step=on_step)
        for i, (prompt, case) in enumerate(zip(prompts, picked, strict=True)):
            _check_against_hf(smollm2_path, run, f"p{i}", prompt, case)
        assert parked, f"{kwargs}: no beam ever waited for a sibling"
        if "num_blocks" in kwargs:
            assert engine.scheduler.num_preemptions > 0
        assert_all_free_or_cached(engine)


async def test_beam_search_with_async_scheduling(smollm2_path: Path) -> None:
    """The engine leaves async scheduling while beams run (their tokens are chosen on the host
    after each step) and takes it up again after: greedy requests around them are unaffected."""
    engine = await make_engine(smollm2_path, async_scheduling=True)
    plain = _ids(smollm2_path, "Once upon a time, in a small village by the sea,", False)
    engine.add_request("g1", plain, greedy(MAX_NEW))
    early = [o for _ in range(3) for o in await engine.step()]  # g1 runs async
    case = CASES[1]
    prompt = _ids(smollm2_path, case[0], case[1])
    engine.add_request("b", prompt, _params(*case[2:]))
    run = await run_all(engine)
    _check_against_hf(smollm2_path, run, "b", prompt, case)
    g1 = [t for o in early for t in o.token_ids] + run.tokens[("g1", 0)]
    assert g1 == hf_greedy(smollm2_path, tuple(plain), MAX_NEW)
    engine.add_request("g2", plain, greedy(MAX_NEW))
    run2 = await run_all(engine)
    assert run2.tokens[("g2", 0)] == hf_greedy(smollm2_path, tuple(plain), MAX_NEW)
    assert_all_free_or_cached(engine)


async def test_beam_abort_releases_every_block(smollm2_path: Path) -> None:
    engine = await make_engine(smollm2_path)
    prompt = _ids(smollm2_path, CASES[2][0], False)
    engine.add_request("a", prompt, _params(8, 3, 1.0, False, max_tokens=40))
    steps = [await engine.step() for _ in range(6)]
    # Beams stream nothing until the end, past one empty output once the prompt is in.
    assert [[(o.index, o.token_ids, o.finished) for o in s] for s in steps if s] == [
        [(0, [], False)]
    ]
    assert len(engine.requests["a"].seqs) == 8
    engine.abort_request("a")
    outputs = await engine.step()
    assert sorted(o.index for o in outputs) == [0, 1, 2]
    assert all(o.finish_reason == FinishReason.ABORT for o in outputs)
    await engine.step()
    assert_all_free_or_cached(engine)


async def test_beam_search_ignore_eos_runs_to_max_tokens(smollm2_path: Path) -> None:
    engine = await make_engine(smollm2_path)
    watch = Watch(engine)
    prompt = _ids(smollm2_path, "Say hi.", True)
    engine.add_request("x", prompt, _params(4, 4, 1.0, False, ignore_eos=True, max_tokens=12))
    run = await run_all(engine)
    # Beams were dropped (released) mid-search, not only the last 4 at the end.
    assert watch.releases > 4 and watch.forks > 1
    assert all(len(run.tokens[("x", i)]) == 12 for i in range(4))
    assert all(run.finish[("x", i)] == FinishReason.LENGTH for i in range(4))
    assert_all_free_or_cached(engine)


_ENGINES: dict[Path, object] = {}


async def _shared_engine(path: Path):
    if path not in _ENGINES:
        _ENGINES[path] = await make_engine(path, num_blocks=64, max_beam_width=8)
    return _ENGINES[path]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"beam_width": 0}, r"beam_width must be in \[1, 8\], got 0"),
        ({"beam_width": 9}, r"beam_width must be in \[1, 8\], got 9"),
        ({"n": 5}, r"n \(5\) must not exceed beam_width \(4\)"),
        ({"temperature": 0.7}, "cannot be combined with sampling parameters: temperature"),
        ({"temperature": 0.7, "top_p": 0.9}, "top_p=0.9"),
        ({"top_k": 40}, "top_k=40"),
        ({"min_p": 0.1}, "min_p=0.1"),
        ({"seed": 7}, "seed=7"),
        ({"presence_penalty": 0.5}, "penalties"),
        ({"logprobs": 2}, "logprobs"),
        ({"length_penalty": float("nan")}, "length_penalty must be finite"),
        ({"early_stopping": "sometimes"}, "early_stopping must be"),
        ({"use_beam_search": False}, "beam_width 4 needs use_beam_search"),
    ],
)
async def test_bad_beam_params_raise(smollm2_path: Path, kwargs: dict, match: str) -> None:
    engine = await _shared_engine(smollm2_path)
    params = _params(4, 2, 1.0, False)
    for k, v in kwargs.items():
        setattr(params, k, v)
    with pytest.raises(ValueError, match=match):
        engine.add_request("bad", [1, 2, 3], params)
    assert not engine.has_unfinished_requests()


# -- the scoring rules alone (no model) ---------------------------------------------------------


def _round(search: BeamSearch, rows: list[dict[int, float]], scores: list[float]):
    lp = np.full((len(rows), search.num_candidates), -50.0, np.float32)
    ids = np.full((len(rows), search.num_candidates), 99, np.int64)
    for b, row in enumerate(rows):
        best = sorted(row.items(), key=lambda kv: -kv[1])
        for j, (t, v) in enumerate(best):
            lp[b, j], ids[b, j] = v, t
        for j in range(len(best), search.num_candidates):
            ids[b, j] = 100 + j  # distinct filler tokens
    return search.round(scores, lp, ids, [[] for _ in rows])


def test_eos_among_the_top_width_candidates_finishes_a_hypothesis() -> None:
    s = BeamSearch(2, 2, 1.0, False, frozenset({EOS}), max_new_tokens=10)
    nxt = _round(s, [{EOS: -0.1, 5: -0.5, 6: -0.7}], [0.0])
    assert [(b.token_id, b.parent) for b in nxt] == [(5, 0), (6, 0)]
    assert [h.token_ids for h in s.finished] == [[EOS]]
    # An EOS ranked past the first `width` candidates is not kept.
    s = BeamSearch(2, 2, 1.0, False, frozenset({EOS}), max_new_tokens=10)
    _round(s, [{5: -0.1, 6: -0.2, EOS: -0.3}], [0.0])
    assert not s.finished


def test_early_stopping_modes() -> None:
    def search(es: bool | str, lp: float = 1.0) -> BeamSearch:
        return BeamSearch(2, 1, lp, es, frozenset({EOS}), max_new_tokens=50)

    # Two finished hypotheses at length 1 (scores -0.1, -0.2), running beam at -0.3.
    rows = [{EOS: -0.1, 5: -0.3, 6: -4.0}, {EOS: -0.2, 7: -5.0}]
    s = search(True)
    assert _round(s, rows, [0.0, 0.0]) is None  # True: done once width hypotheses exist
    s = search(False)
    assert _round(s, rows, [0.0, 0.0]) is None  # best running -0.3 cannot beat -0.2
    # "never" with a positive length penalty judges the running beam at the longest length:
    # -0.3 / 50 beats -0.2, so the search goes on.
    s = search("never")
    assert _round(s, rows, [0.0, 0.0]) is not None
    assert s.improvable
