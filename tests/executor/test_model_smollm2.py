"""SmolLM2-135M-Instruct, real weights (the default model, from its GGUF file): greedy output of
our paged model equals transformers' `generate`, token for token."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from pagemesh.services.executor.model.loader import load_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.support.model import PagedRunner

PROMPTS = [
    "The history of the Roman Empire",
    "def fibonacci(n):",
    "Once upon a time, in a small village by the sea, there lived an old fisherman who",
]
MAX_NEW_TOKENS = 16


@pytest.fixture(scope="module")
def smollm2(smollm2_path: Path):
    model, config = load_model(smollm2_path, "cpu", torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(smollm2_path)
    return model, config, tokenizer


@pytest.fixture(scope="module")
def hf_model(smollm2_path: Path):
    return AutoModelForCausalLM.from_pretrained(smollm2_path, dtype=torch.float32).eval()


def _hf_greedy(hf_model, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    out = hf_model.generate(
        torch.tensor([prompt_ids]), max_new_tokens=max_new_tokens, do_sample=False
    )
    return out[0, len(prompt_ids) :].tolist()


def _tables(num_seqs: int, blocks_each: int, num_blocks: int) -> list[list[int]]:
    ids = list(range(num_blocks))
    random.Random(0).shuffle(ids)
    return [ids[i * blocks_each : (i + 1) * blocks_each] for i in range(num_seqs)]


def test_batched_greedy_equals_transformers_generate(smollm2, hf_model) -> None:
    model, config, tokenizer = smollm2
    prompts = [tokenizer(p)["input_ids"] for p in PROMPTS]
    runner = PagedRunner(model, config, num_blocks=32, block_size=16)
    # all prompts in one packed prefill, then batched decode steps
    ours = runner.greedy(prompts, MAX_NEW_TOKENS, _tables(len(prompts), 4, 32))
    for prompt, out in zip(prompts, ours, strict=True):
        ref = _hf_greedy(hf_model, prompt, MAX_NEW_TOKENS)
        # transformers stops at EOS; our loop does not, so compare up to its end
        assert out[: len(ref)] == ref, tokenizer.decode(prompt)


def test_chat_capital_of_france(smollm2) -> None:
    model, config, tokenizer = smollm2
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        tokenize=False,
        add_generation_prompt=True,
    )
    prompt = tokenizer(text, add_special_tokens=False)["input_ids"]
    runner = PagedRunner(model, config, num_blocks=8, block_size=16)
    out = runner.greedy([prompt], 12, [[6, 2, 7, 0]])[0]
    eos = config.eos_token_ids[0]
    assert eos in out
    assert tokenizer.decode(out[: out.index(eos)]) == "The capital of France is Paris."
