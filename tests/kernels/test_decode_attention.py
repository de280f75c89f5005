"""Triton paged decode attention against the PyTorch reference (interpreter on CPU)."""

from __future__ import annotations

import pytest
import torch
from pagemesh.kernels import reference

from pagemesh import kernels
from tests.kernels.paged import TOL, make_paged, rel_err


def _run_decode(
    seq_lens: list[int],
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    page: int,
    dtype: torch.dtype,
    device: torch.device,
    seed: int,
    **kwargs: object,
) -> float:
    gen = torch.Generator().manual_seed(seed)
    paged = make_paged(seq_lens, num_kv_heads, head_dim, page, dtype, device, gen)
    q = torch.randn((len(seq_lens), num_heads, head_dim), generator=gen).to(dtype).to(device)
    scale = head_dim**-0.5
    ref = reference.paged_decode_attention(
        q.cpu(),
        paged.key_cache.cpu(),
        paged.value_cache.cpu(),
        paged.block_tables.cpu(),
        paged.seq_lens.cpu(),
        scale,
        out=torch.empty(q.shape, dtype=torch.float32),
    )
    out = torch.full_like(q, float("nan"))  # poisoned: every element must be written
    got = kernels.paged_decode_attention(
        q,
        paged.key_cache,
        paged.value_cache,
        paged.block_tables,
        paged.seq_lens,
        scale,
        out,
        **kwargs,
    )
    assert got is out
    return rel_err(out.cpu(), ref)


# Lengths: 1, exact multiples of the page, one past, and odd ones, in shuffled order.
RAGGED = [17, 1, 32, 5, 33, 16]


@pytest.mark.parametrize(
    ("num_heads", "num_kv_heads"), [(2, 2), (6, 2), (8, 2), (8, 1)], ids=["g1", "g3", "g4", "g8"]
)
@pytest.mark.parametrize(
    ("num_splits", "fused_merge"), [(1, True), (3, True), (3, False)], ids=["s1", "s3", "s3k2"]
)
def test_decode_fp32_gqa(
    num_heads: int, num_kv_heads: int, num_splits: int, fused_merge: bool, device: torch.device
) -> None:
    err = _run_decode(
        RAGGED,
        num_heads,
        num_kv_heads,
        64,
        16,
        torch.float32,
        device,
        seed=num_heads * 7 + num_splits,
        num_splits=num_splits,
        fused_merge=fused_merge,
    )
    assert err <= TOL[torch.float32], err


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_decode_half_precision(dtype: torch.dtype, device: torch.device) -> None:
    err = _run_decode(RAGGED, 8, 2, 64, 16, dtype, device, seed=3)
    assert err <= TOL[dtype], err


def test_decode_head_dim_96_page_32(device: torch.device) -> None:
    # A head dim that is not a power of two (padded to 128 inside) and a larger page.
    err = _run_decode([64, 1, 33, 65], 4, 1, 96, 32, torch.float32, device, seed=5, num_splits=2)
    assert err <= TOL[torch.float32], err


@pytest.mark.gpu
@pytest.mark.parametrize(("num_heads", "num_kv_heads"), [(32, 8), (32, 32), (28, 4), (16, 1)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_decode_gpu_real_sizes(
    num_heads: int, num_kv_heads: int, dtype: torch.dtype, device: torch.device
) -> None:
    gen = torch.Generator().manual_seed(num_heads + num_kv_heads)
    lens = [1, 16, 17, 2048, 4096, 4097, *torch.randint(1, 8192, (10,), generator=gen).tolist()]
    for head_dim, page in [(128, 16), (64, 32)]:
        err = _run_decode(lens, num_heads, num_kv_heads, head_dim, page, dtype, device, seed=1)
        assert err <= TOL[dtype], (head_dim, page, err)


@pytest.mark.parametrize("fused_merge", [False, True])
def test_decode_empty_sequence_and_repeat(fused_merge: bool, device: torch.device) -> None:
    """A length-0 row (padding of a captured batch) gets zeros, and a second launch gives the
    same output (the fused merge's arrival counters reset themselves)."""
    gen = torch.Generator().manual_seed(9)
    paged = make_paged([40, 1, 33], 1, 32, 16, torch.float32, device, gen)
    paged.seq_lens[1] = 0
    q = torch.randn((3, 4, 32), generator=gen).to(device)
    outs = []
    for _ in range(2):
        out = torch.full_like(q, float("nan"))
        kernels.paged_decode_attention(
            q, paged.key_cache, paged.value_cache, paged.block_tables, paged.seq_lens, 0.2, out,
            num_splits=3, fused_merge=fused_merge,
        )  # fmt: skip
        outs.append(out.cpu())
    assert torch.equal(outs[0], outs[1])
    assert torch.equal(outs[0][1], torch.zeros_like(outs[0][1]))
    assert torch.isfinite(outs[0]).all()


@pytest.mark.gpu
def test_decode_gpu_fused_merge_repeatable(device: torch.device) -> None:
    """Many slices finishing together: 200 launches must agree bit for bit with the first and
    with the two-kernel merge (a race in the arrival counters or the partials shows here)."""
    gen = torch.Generator().manual_seed(4)
    lens = [8192, 1, 4000, 16, 8191, 777]
    paged = make_paged(lens, 8, 128, 16, torch.bfloat16, device, gen)
    q = torch.randn((len(lens), 32, 128), generator=gen).to(torch.bfloat16).to(device)
    args = (q, paged.key_cache, paged.value_cache, paged.block_tables, paged.seq_lens, 0.088)
    first = kernels.paged_decode_attention(*args, num_splits=64, fused_merge=True)
    two_kernel = kernels.paged_decode_attention(*args, num_splits=64, fused_merge=False)
    torch.testing.assert_close(first, two_kernel, rtol=0, atol=1e-2)
    for _ in range(200):
        again = kernels.paged_decode_attention(*args, num_splits=64, fused_merge=True)
        assert torch.equal(again, first)
