"""vLLM's prompt_logprobs through the engine (SmolLM2 on CPU), against transformers' own forward
over the same prompt: each prompt token after the first gets its logprob, rank and top
alternatives; chunked prefill, a cached prefix and n > 1 do not change them."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from pagemesh.services.executor.engine_api import SamplingParams

from tests.executor.engine_support import (
    assert_all_free_or_cached,
    greedy,
    hf_model,
    make_engine,
    run_all,
    tokenizer,
)

PROMPT = (
    "The three primary colors are red, yellow and blue. Mixing red and yellow gives orange,"
    " mixing yellow and blue gives green, and mixing blue and red gives"
)  # 3 blocks and more: a prefix that can be cached


def _reference(path: Path, ids: list[int]) -> torch.Tensor:
    """[P - 1, vocab] logprobs of prompt tokens 1.. from transformers, in float32."""
    with torch.inference_mode():
        logits = hf_model(path)(torch.tensor([ids])).logits[0, :-1].float()
    return torch.log_softmax(logits, dim=-1)


def _check(entries, ids: list[int], ref: torch.Tensor, k: int) -> None:
    assert len(entries) == len(ids) - 1  # the first prompt token has none
    for j, e in enumerate(entries):
        token = ids[j + 1]
        assert e.token_id == token
        assert abs(e.logprob - ref[j, token].item()) < 2e-3, j
        assert e.rank == int((ref[j] > ref[j, token]).sum()) + 1, j
        assert len(e.top) == k
        if k:
            want = ref[j].topk(k)
            assert [t for t, _ in e.top] == want.indices.tolist(), j
            for (_, v), w in zip(e.top, want.values.tolist(), strict=True):
                assert abs(v - w) < 2e-3


@pytest.mark.parametrize("budget", [8192, 7])  # whole, then chunks of 7 tokens
async def test_prompt_logprobs_match_transformers(smollm2_path: Path, budget: int) -> None:
    ids = tokenizer(smollm2_path)(PROMPT)["input_ids"]
    ref = _reference(smollm2_path, ids)
    engine = await make_engine(smollm2_path, max_num_batched_tokens=max(budget, 256))
    if budget < 256:  # (max_num_batched_tokens must cover max_num_seqs: set it directly)
        engine.config.max_num_batched_tokens = budget
    # A plain request first: its prompt is cached, and must not be hit by the scored one.
    engine.add_request("plain", ids, greedy(2))
    await run_all(engine)
    engine.add_request("scored", ids, greedy(3, prompt_logprobs=2))
    engine.add_request("own", ids, greedy(2, prompt_logprobs=0))
    run = await run_all(engine)
    by_rid = {o.request_id: o for o in run.outputs if o.prompt_logprobs}
    _check(by_rid["scored"].prompt_logprobs, ids, ref, 2)
    _check(by_rid["own"].prompt_logprobs, ids, ref, 0)
    # Sent once, with the first output; no cached token counted (every position computed).
    assert sum(1 for o in run.outputs if o.prompt_logprobs) == 2
    assert all(o.num_cached_tokens == 0 for o in run.outputs if o.request_id != "plain")
    # The plain prompt still hits afterwards: nothing the scored ones did displaced it.
    engine.add_request("again", ids, greedy(1))
    run = await run_all(engine)
    assert run.outputs[0].num_cached_tokens > 0
    assert_all_free_or_cached(engine)


async def test_prompt_logprobs_with_n_and_refused_with_beams(smollm2_path: Path) -> None:
    ids = tokenizer(smollm2_path)(PROMPT)["input_ids"]
    ref = _reference(smollm2_path, ids)
    engine = await make_engine(smollm2_path)
    params = SamplingParams(temperature=1.0, seed=3, n=3, max_tokens=3, prompt_logprobs=1)
    engine.add_request("n3", ids, params)
    run = await run_all(engine)
    scored = [o for o in run.outputs if o.prompt_logprobs]
    assert len(scored) == 1 and scored[0].index == 0
    _check(scored[0].prompt_logprobs, ids, ref, 1)
    assert len({k for k in run.tokens if k[0] == "n3"}) == 3
    beams = SamplingParams(
        temperature=0.0, use_beam_search=True, beam_width=2, max_tokens=3, prompt_logprobs=1
    )
    with pytest.raises(ValueError, match="prompt_logprobs"):
        engine.add_request("beams", ids, beams)
    with pytest.raises(ValueError, match="prompt_logprobs must be in"):
        engine.add_request("many", ids, greedy(1, prompt_logprobs=21))
    assert_all_free_or_cached(engine)
