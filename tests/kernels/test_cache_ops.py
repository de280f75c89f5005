"""Triton KV cache write and block copy against the PyTorch reference."""

from __future__ import annotations

import pytest
import torch
from pagemesh.kernels import reference

from pagemesh import kernels


def _caches(
    num_blocks: int, page: int, heads: int, dim: int, dtype: torch.dtype, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    shape = (num_blocks, page, heads, dim)
    return (
        torch.randn(shape, generator=gen).to(dtype),
        torch.randn(shape, generator=gen).to(dtype),
    )


@pytest.mark.parametrize(
    ("src_dtype", "cache_dtype"),
    [
        (torch.float32, torch.float32),
        (torch.float32, torch.bfloat16),
        (torch.float16, torch.float16),
    ],
)
def test_write_kv_cache(
    src_dtype: torch.dtype, cache_dtype: torch.dtype, device: torch.device
) -> None:
    gen = torch.Generator().manual_seed(11)
    num_blocks, page, heads, dim, tokens = 9, 16, 3, 48, 21
    kc, vc = _caches(num_blocks, page, heads, dim, cache_dtype, gen)
    # Keys/values as strided views of a fused qkv-like buffer (not contiguous per token).
    fused = torch.randn((tokens, 2 * heads + 1, dim), generator=gen).to(src_dtype)
    key, value = fused[:, :heads], fused[:, heads : 2 * heads]
    slots = torch.randperm(num_blocks * page, generator=gen)[:tokens]
    slots[[2, 7, 20]] = -1  # padding tokens are skipped
    ref_k, ref_v = kc.clone(), vc.clone()
    reference.write_kv_cache(key, value, ref_k, ref_v, slots)
    got_k, got_v = kc.to(device), vc.to(device)
    kernels.write_kv_cache(key.to(device), value.to(device), got_k, got_v, slots.to(device))
    for got, ref in ((got_k.cpu(), ref_k), (got_v.cpu(), ref_v)):
        if src_dtype == cache_dtype:
            assert torch.equal(got, ref)
        else:
            # Triton's interpreter rounds float32 -> bfloat16 toward zero where the GPU and
            # PyTorch round to nearest: allow one unit in the last place.
            torch.testing.assert_close(got, ref, rtol=2**-7, atol=0)


def test_copy_blocks(device: torch.device) -> None:
    gen = torch.Generator().manual_seed(12)
    layers = [_caches(10, 16, 2, 32, torch.bfloat16, gen) for _ in range(3)]
    mapping = torch.tensor([[3, 7], [0, 9], [5, 1]], dtype=torch.int64)
    ref_k = [k.clone() for k, _ in layers]
    ref_v = [v.clone() for _, v in layers]
    reference.copy_blocks(ref_k, ref_v, mapping)
    got_k = [k.to(device) for k, _ in layers]
    got_v = [v.to(device) for _, v in layers]
    kernels.copy_blocks(got_k, got_v, mapping.to(device))
    for got, ref in zip([*got_k, *got_v], [*ref_k, *ref_v], strict=True):
        assert torch.equal(got.cpu(), ref)
    kernels.copy_blocks(got_k, got_v, torch.empty((0, 2), dtype=torch.int64))
