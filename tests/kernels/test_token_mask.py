"""Structured output's mask kernel (Triton; interpreted on CPU) and its PyTorch reference,
both against a per-token unpacking of the bitmask with numpy."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pagemesh.kernels import reference

from pagemesh import kernels


def _expected(logits: torch.Tensor, bitmask: torch.Tensor, rows: list[int], vocab: int):
    out = logits.float().clone()
    for i, r in enumerate(rows):
        words = bitmask[i].numpy().view(np.uint8)
        allowed = np.unpackbits(words, bitorder="little")[:vocab].astype(bool)
        cols = np.ones(out.shape[1], dtype=bool)  # disallowed
        cols[:vocab] = ~allowed
        out[r, torch.from_numpy(cols)] = float("-inf")
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("indexed", [False, True])
@pytest.mark.parametrize("impl", ["kernel", "reference"])
def test_apply_token_bitmask(
    dtype: torch.dtype, indexed: bool, impl: str, device: torch.device
) -> None:
    gen = torch.Generator().manual_seed(3)
    vocab, width = 1000, 1040  # a vocabulary not a multiple of 32, padded logits
    words = -(-vocab // 32)
    logits = torch.randn(5, width, generator=gen).to(dtype)
    rows = [4, 1, 2] if indexed else [0, 1, 2, 3, 4]
    bitmask = torch.randint(-(2**31), 2**31 - 1, (len(rows), words), generator=gen)
    bitmask = bitmask.to(torch.int32)
    bitmask[1] = -1  # everything allowed: only the padding goes
    bitmask[2, :3] = 0  # a run of disallowed words
    expected = _expected(logits, bitmask, rows, vocab)
    got = logits.to(device)
    index = torch.tensor(rows, device=device) if indexed else None
    apply = kernels.apply_token_bitmask if impl == "kernel" else reference.apply_token_bitmask
    apply(got, bitmask.to(device), index, vocab)
    assert torch.equal(got.cpu().float(), expected)


@pytest.mark.gpu
def test_apply_token_bitmask_on_the_gpu_at_a_real_vocabulary() -> None:
    # SmolLM2's 49,152 tokens, bf16 logits, a mixed batch (16 of 64 rows constrained).
    gen = torch.Generator().manual_seed(5)
    vocab, rows = 49152, list(range(0, 64, 4))
    logits = torch.randn(64, vocab, generator=gen).to(torch.bfloat16)
    bitmask = torch.randint(-(2**31), 2**31 - 1, (16, vocab // 32), generator=gen)
    bitmask = bitmask.to(torch.int32)
    expected = _expected(logits, bitmask, rows, vocab)
    got = logits.cuda()
    kernels.apply_token_bitmask(got, bitmask.cuda(), torch.tensor(rows).cuda(), vocab)
    assert torch.equal(got.cpu().float(), expected)
