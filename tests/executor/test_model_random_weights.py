"""Random-weight small configs of each supported architecture: our paged model must give the
same logits as transformers' own implementation (float32), loaded through our loader from a
`save_pretrained` directory, over packed batches, chunked prefill on a cached prefix and
decode steps, with shuffled block tables."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
import transformers
from pagemesh.services.executor.model.loader import load_model
from pagemesh.services.executor.model.rope import rope_inv_freq
from torch import nn

from tests.support.model import PagedRunner, PagedSequence

BLOCK_SIZE = 4
NUM_BLOCKS = 48
SMALL = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    rms_norm_eps=1e-5,
)

CONFIGS: dict[str, tuple[str, dict]] = {
    "llama3": (
        "LlamaConfig",
        dict(
            rope_theta=500000.0,
            # original_max_position_embeddings small enough that, at head_dim 16, some
            # frequencies are kept, some divided and some interpolated.
            rope_scaling=dict(
                rope_type="llama3",
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=64,
            ),
            attention_bias=True,
            mlp_bias=True,
        ),
    ),
    "llama2_linear": (
        "LlamaConfig",
        dict(rope_scaling=dict(rope_type="linear", factor=2.0), num_key_value_heads=4),
    ),
    "qwen2": ("Qwen2Config", dict(rope_theta=1000000.0, tie_word_embeddings=True)),
    "qwen2_yarn": (
        "Qwen2Config",
        dict(rope_scaling=dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=128)),
    ),
    "qwen3": ("Qwen3Config", dict(head_dim=32, num_key_value_heads=1)),
    "mistral": ("MistralConfig", dict(sliding_window=None)),
}


def _build_hf(name: str, path: Path) -> transformers.PreTrainedModel:
    config_cls, extra = CONFIGS[name]
    config = getattr(transformers, config_cls)(**{**SMALL, **extra})
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    # transformers zero-inits biases and one-inits norms: randomise everything so that biases
    # and norm weights are really checked.
    with torch.no_grad():
        for param_name, param in model.named_parameters():
            if "norm" in param_name:
                param.copy_(1.0 + 0.2 * torch.randn_like(param))
            else:
                param.normal_(0.0, 0.08)
    model.eval()
    model.save_pretrained(path)
    return model


@pytest.fixture(params=sorted(CONFIGS))
def models(request: pytest.FixtureRequest, tmp_path: Path):
    hf = _build_hf(request.param, tmp_path / request.param)
    ours, config = load_model(tmp_path / request.param, "cpu", torch.float32)
    return hf, ours, config


def _hf_logits(hf: transformers.PreTrainedModel, tokens: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf(torch.tensor([tokens])).logits[0].float()


def _shuffled_tables(num_seqs: int, blocks_each: int, seed: int) -> list[list[int]]:
    ids = list(range(NUM_BLOCKS))
    random.Random(seed).shuffle(ids)
    return [ids[i * blocks_each : (i + 1) * blocks_each] for i in range(num_seqs)]


def test_logits_match_transformers(models) -> None:
    hf, ours, config = models
    gen = torch.Generator().manual_seed(1)
    lengths = [(13, 7), (22, 1), (5, 11)]  # (first chunk, second chunk) per sequence
    tokens = [
        torch.randint(0, config.vocab_size, (a + b + 3,), generator=gen).tolist()
        for a, b in lengths
    ]
    runner = PagedRunner(ours, config, num_blocks=NUM_BLOCKS, block_size=BLOCK_SIZE)
    seqs = [PagedSequence(block_table=t) for t in _shuffled_tables(3, 10, seed=2)]
    refs = [_hf_logits(hf, t) for t in tokens]

    # 1. packed prefill of the first chunks
    logits = runner.step(seqs, [t[:a] for t, (a, _) in zip(tokens, lengths, strict=True)])
    expected = torch.cat([r[:a] for r, (a, _) in zip(refs, lengths, strict=True)])
    torch.testing.assert_close(logits, expected, atol=2e-4, rtol=1e-4)

    # 2. second chunks continue over the paged cache (one of them is a single token, so the
    #    batch mixes a decode-like row into a prefill step)
    logits = runner.step(seqs, [t[a : a + b] for t, (a, b) in zip(tokens, lengths, strict=True)])
    expected = torch.cat([r[a : a + b] for r, (a, b) in zip(refs, lengths, strict=True)])
    torch.testing.assert_close(logits, expected, atol=2e-4, rtol=1e-4)

    # 3. decode steps: one token per sequence (the decode kernel path)
    for step in range(2):
        new = [[t[a + b + step]] for t, (a, b) in zip(tokens, lengths, strict=True)]
        logits = runner.step(seqs, new)
        expected = torch.stack([r[a + b + step] for r, (a, b) in zip(refs, lengths, strict=True)])
        torch.testing.assert_close(logits, expected, atol=2e-4, rtol=1e-4)

    # 4. one sequence alone: the batch-1 decode (matrix-vector products on the weights that
    #    load_model stored column-major on CPU: model/cpu_layout.py)
    last = sum(lengths[0]) + 2
    logits = runner.step(seqs[:1], [[tokens[0][last]]])
    torch.testing.assert_close(logits[0], refs[0][last], atol=2e-4, rtol=1e-4)


def test_cpu_decode_layout(models) -> None:
    """Column-major exactly where the output is at least as wide as the input; the embedding
    only when it also computes the logits (tied)."""
    _, ours, config = models
    for name, module in ours.named_modules():
        if isinstance(module, nn.Linear):
            out_f, in_f = module.weight.shape
            column_major = module.weight.stride() == (1, out_f)
            assert column_major == (out_f >= in_f), name
            assert module.weight.is_contiguous() == (not column_major), name
    embed = ours.model.embed_tokens.weight
    assert embed.is_contiguous() == (not config.tie_word_embeddings)


def test_rope_frequencies_equal_transformers(models) -> None:
    hf, _, config = models
    torch.testing.assert_close(
        rope_inv_freq(config), hf.model.rotary_emb.inv_freq.float(), atol=0, rtol=0
    )
