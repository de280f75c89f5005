"""The batched sampler on random logits: each stage against its definition."""

from __future__ import annotations

import pytest
import torch
from pagemesh.services.executor.engine_api import SamplingParams
from pagemesh.services.executor.sampler import (
    Sampler,
    build_sampling_tensors,
    draw_seed,
    token_counts,
)

V = 50


def _sample(params, logits, draws=None, counts=None, seed=0, sampler=None):
    st = build_sampling_tensors(params, draws or [None] * len(params), V, logits.device)
    sampler = sampler or Sampler(V, logits.device, seed)
    return sampler(logits, st, counts)


def test_greedy_is_argmax() -> None:
    logits = torch.randn(6, V)
    out = _sample([SamplingParams(temperature=0.0)] * 6, logits)
    assert out.token_ids.tolist() == logits.argmax(-1).tolist()
    assert out.logprobs is None


def test_degenerate_filters_equal_greedy() -> None:
    logits = torch.randn(8, V)
    params = [
        SamplingParams(temperature=1.0, top_k=1),
        SamplingParams(temperature=2.0, top_p=1e-6),
        SamplingParams(temperature=1.0, min_p=1.0),
        SamplingParams(temperature=0.0),
    ] * 2
    for seed in range(5):
        out = _sample(params, logits, seed=seed)
        assert out.token_ids.tolist() == logits.argmax(-1).tolist()


def test_top_k_and_top_p_keep_their_sets() -> None:
    torch.manual_seed(0)
    logits = torch.randn(1, V).repeat(400, 1)
    allowed_k = set(logits[0].topk(5).indices.tolist())
    out = _sample([SamplingParams(temperature=1.0, top_k=5)] * 400, logits)
    assert set(out.token_ids.tolist()) <= allowed_k
    assert len(set(out.token_ids.tolist())) > 1
    probs = torch.softmax(logits[0], -1)
    order = probs.argsort(descending=True)
    mass = probs[order].cumsum(0)
    nucleus = set(order[: int((mass < 0.5).sum()) + 1].tolist())
    out = _sample([SamplingParams(temperature=1.0, top_p=0.5)] * 400, logits)
    assert set(out.token_ids.tolist()) <= nucleus


def test_min_p_drops_unlikely_tokens() -> None:
    logits = torch.randn(1, V).repeat(300, 1)
    probs = torch.softmax(logits[0], -1)
    keep = set(torch.nonzero(probs >= 0.3 * probs.max()).flatten().tolist())
    out = _sample([SamplingParams(temperature=1.0, min_p=0.3)] * 300, logits)
    assert set(out.token_ids.tolist()) <= keep


def test_sampling_follows_the_distribution() -> None:
    logits = torch.full((4000, V), -30.0)
    logits[:, :4] = torch.log(torch.tensor([0.1, 0.2, 0.3, 0.4]))
    out = _sample([SamplingParams(temperature=1.0)] * 4000, logits)
    freq = torch.bincount(out.token_ids, minlength=V)[:4].float() / 4000
    assert torch.allclose(freq, torch.tensor([0.1, 0.2, 0.3, 0.4]), atol=0.04)


def test_temperature_sharpens() -> None:
    logits = torch.zeros(2000, V)
    logits[:, 0] = 1.0
    cold = _sample([SamplingParams(temperature=0.1)] * 2000, logits)
    hot = _sample([SamplingParams(temperature=10.0)] * 2000, logits)
    assert (cold.token_ids == 0).float().mean() > 0.99
    assert (hot.token_ids == 0).float().mean() < 0.1


def test_seeded_rows_do_not_depend_on_the_batch() -> None:
    logits = torch.randn(5, V)
    p = SamplingParams(temperature=1.0, seed=7)
    alone = [_sample([p], logits[2:3], [draw_seed(7, 0)]).token_ids.item() for _ in range(3)]
    batch = [
        _sample(
            [SamplingParams(temperature=1.0)] * 2 + [p] * 3,
            logits,
            [None, None, draw_seed(7, 0), draw_seed(7, 1), None],
            seed=s,
        )
        .token_ids[2]
        .item()
        for s in range(3)
    ]
    assert alone == batch


def _seeded_run(logits: torch.Tensor, seed: int, start: int, sampler: Sampler) -> list[int]:
    """One seeded row sampled step by step from position `start`: step j reads logits[j]."""
    p = SamplingParams(temperature=1.0, seed=seed)
    return [
        _sample([p], logits[j : j + 1], [draw_seed(seed, j)], sampler=sampler).token_ids.item()
        for j in range(start, len(logits))
    ]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_a_seeded_stream_resumes_at_any_position(device: str) -> None:
    """The draw at position k is the k-th draw of a fresh run, whatever ran before it in the
    sampler: a migrated continuation (seed_position = k) or a recomputed sequence samples what
    the uninterrupted run did."""
    dev = torch.device(device)
    torch.manual_seed(0)
    logits = torch.randn(24, V).to(dev)  # flat enough that every draw matters
    fresh = _seeded_run(logits, 11, 0, Sampler(V, dev))
    assert fresh == _seeded_run(logits, 11, 0, Sampler(V, dev, seed=5))
    busy = Sampler(V, dev)
    for k in (1, 7, 23):
        _sample([SamplingParams(temperature=1.0)] * 3, torch.randn(3, V).to(dev), sampler=busy)
        assert _seeded_run(logits, 11, k, busy) == fresh[k:], f"resumed at {k}"
    # The positions draw independently (not one draw repeated), and so do other seeds.
    same = logits[:1].repeat(len(logits), 1)
    assert len(set(_seeded_run(same, 11, 0, busy))) > 3
    assert _seeded_run(logits, 12, 0, busy) != fresh


def test_draw_seeds_are_distinct_and_in_range() -> None:
    seeds = {draw_seed(s, k) for s in (0, 1, 2, (1 << 63) - 1) for k in range(1000)}
    assert len(seeds) == 4000
    assert all(0 <= d < 1 << 64 for d in seeds)


def test_logprobs_and_top_n() -> None:
    logits = torch.randn(3, V)
    params = [
        SamplingParams(temperature=0.0, logprobs=4),
        SamplingParams(temperature=0.0, return_logprobs=True),
        SamplingParams(temperature=0.0),
    ]
    out = _sample(params, logits)
    ref = torch.log_softmax(logits, -1)
    assert torch.allclose(out.logprobs, ref.max(-1).values)
    assert out.top_ids.shape == (3, 4)
    assert out.top_ids[:, 0].tolist() == out.token_ids.tolist()
    assert torch.allclose(out.top_logprobs, ref.topk(4, -1).values)


def test_penalties() -> None:
    logits = torch.tensor([[2.0, -1.0, 0.5, 0.0] + [-9.0] * (V - 4)])
    tokens = torch.tensor([[1, 0, 0, 2]])  # prompt [1], outputs [0, 0, 2]
    counts = token_counts(tokens, torch.tensor([1]), torch.tensor([4]), V)
    assert counts[0][0, :4].tolist() == [2.0, 0.0, 1.0, 0.0]
    assert counts[1][0, :4].tolist() == [True, True, True, False]
    p = SamplingParams(
        temperature=0.0, presence_penalty=0.5, frequency_penalty=0.25, repetition_penalty=2.0
    )
    st = build_sampling_tensors([p], [None], V, torch.device("cpu"))
    got = Sampler(V, torch.device("cpu")).apply_penalties(logits.clone(), st, *counts)
    # token 0: 2/2 - 0.25*2 - 0.5 = 0; token 1 (prompt only): -1*2 = -2; token 2: 0.5/2 - 0.25 - 0.5
    assert torch.allclose(got[0, :4], torch.tensor([0.0, -2.0, -0.5, 0.0]))


def test_logit_bias_per_row() -> None:
    """The bias is added to its row's logits before greedy or sampled choice; logprobs stay the
    model's own; rows without a bias are untouched."""
    torch.manual_seed(0)
    logits = torch.randn(4, V)
    top = logits.argmax(-1)
    params = [
        SamplingParams(temperature=0.0, logit_bias={int(top[0]): -100.0}),  # ban the argmax
        SamplingParams(temperature=0.0, logit_bias={7: 100.0}, return_logprobs=True),  # force 7
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=1.0, logit_bias={t: -100.0 for t in range(V) if t != 3}),
    ]
    out = _sample(params, logits)
    second = logits[0].clone()
    second[top[0]] = float("-inf")
    assert out.token_ids[0].item() == second.argmax().item()
    assert out.token_ids[1].item() == 7
    assert out.token_ids[2].item() == top[2].item()
    assert out.token_ids[3].item() == 3  # every other token banned: sampling must pick 3
    assert torch.allclose(out.logprobs[1], torch.log_softmax(logits[1], -1)[7])
