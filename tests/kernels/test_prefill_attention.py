"""Triton paged prefill attention against the PyTorch reference (interpreter on CPU)."""

from __future__ import annotations

import pytest
import torch
from pagemesh.kernels import reference

from pagemesh import kernels
from tests.kernels.paged import TOL, make_paged, rel_err


def _run_prefill(
    seq_lens: list[int],
    q_lens: list[int],
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    page: int,
    dtype: torch.dtype,
    device: torch.device,
    seed: int,
    decode_rows: bool = False,
) -> float:
    gen = torch.Generator().manual_seed(seed)
    paged = make_paged(seq_lens, num_kv_heads, head_dim, page, dtype, device, gen)
    qsl = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    q = torch.randn((int(qsl[-1]), num_heads, head_dim), generator=gen).to(dtype).to(device)
    scale = head_dim**-0.5
    ref = reference.paged_prefill_attention(
        q.cpu(),
        paged.key_cache.cpu(),
        paged.value_cache.cpu(),
        paged.block_tables.cpu(),
        paged.seq_lens.cpu(),
        qsl,
        scale,
        out=torch.empty(q.shape, dtype=torch.float32),
    )
    out = torch.full_like(q, float("nan"))
    got = kernels.paged_prefill_attention(
        q,
        paged.key_cache,
        paged.value_cache,
        paged.block_tables,
        paged.seq_lens,
        qsl.to(device),
        scale,
        out,
        decode_rows=decode_rows,
    )
    assert got is out
    return rel_err(out.cpu(), ref)  # a row left unwritten stays NaN: the error is NaN


# (context length, new tokens): a whole prompt, a prefix hit of exactly one page, one past,
# a single new token (chunked prefill's tail), a new chunk after a partial page.
RAGGED = ([20, 32, 17, 9, 40], [20, 16, 1, 9, 23])


@pytest.mark.parametrize(
    ("num_heads", "num_kv_heads"), [(2, 2), (6, 2), (4, 1), (8, 1)], ids=["g1", "g3", "g4", "g8"]
)
@pytest.mark.parametrize("decode_rows", [False, True], ids=["one-kernel", "decode-rows"])
def test_prefill_fp32_gqa(
    num_heads: int, num_kv_heads: int, decode_rows: bool, device: torch.device
) -> None:
    err = _run_prefill(
        *RAGGED, num_heads, num_kv_heads, 64, 16, torch.float32, device, 21, decode_rows
    )
    assert err <= TOL[torch.float32], err


@pytest.mark.parametrize("decode_rows", [False, True], ids=["one-kernel", "decode-rows"])
def test_prefill_bf16(decode_rows: bool, device: torch.device) -> None:
    err = _run_prefill(*RAGGED, 4, 2, 64, 16, torch.bfloat16, device, 22, decode_rows)
    assert err <= TOL[torch.bfloat16], err


# A mixed step: decodes (one new token) around prefill chunks, and the zero-length padding
# sequences a captured graph adds at the end.
MIXED = ([30, 7, 45, 16, 1, 60, 0, 0], [1, 1, 12, 1, 1, 60, 0, 0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_rows_of_a_mixed_step(dtype: torch.dtype, device: torch.device) -> None:
    """decode_rows=True: the one-token queries go to the decode kernel (at their packed row),
    the rest to the prefill kernel; together they write every row, as the reference does."""
    for seed in (31, 32):
        err = _run_prefill(*MIXED, 8, 2, 64, 16, dtype, device, seed, decode_rows=True)
        assert err <= TOL[dtype], (seed, err)


def test_prefill_head_dim_96_page_32(device: torch.device) -> None:
    err = _run_prefill([70, 33], [35, 33], 3, 1, 96, 32, torch.float32, device, seed=23)
    assert err <= TOL[torch.float32], err


@pytest.mark.gpu
@pytest.mark.parametrize(("num_heads", "num_kv_heads"), [(32, 8), (32, 32), (28, 4), (16, 1)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_prefill_gpu_real_sizes(
    num_heads: int, num_kv_heads: int, dtype: torch.dtype, device: torch.device
) -> None:
    seq_lens = [2048, 1024, 1, 300, 2100, 129, 1000]
    q_lens = [1024, 1024, 1, 17, 1050, 128, 999]
    for head_dim, page in [(128, 16), (64, 32)]:
        err = _run_prefill(
            seq_lens, q_lens, num_heads, num_kv_heads, head_dim, page, dtype, device, seed=2
        )
        assert err <= TOL[dtype], (head_dim, page, err)
    # A mixed step at real sizes: 200 decodes over ~1.2k-token contexts around prefill chunks
    # of a cached prefix (the serving benchmark's shared-prefix steps), decode split or not.
    gen = torch.Generator().manual_seed(3)
    decodes = torch.randint(1, 1300, (200,), generator=gen).tolist()
    seq_lens = [*decodes[:100], 1200, 1190, 1, *decodes[100:], 1250, 0]
    q_lens = [*[1] * 100, 170, 1190, 1, *[1] * 100, 64, 0]
    err = _run_prefill(seq_lens, q_lens, num_heads, num_kv_heads, 128, 16, dtype, device, 4, True)
    assert err <= TOL[dtype], ("mixed", err)
    err = _run_prefill([*seq_lens[:3], 1300, 0], [1, 1, 1, 700, 0], num_heads, num_kv_heads,
                       64, 32, dtype, device, 5, True)  # fmt: skip
    assert err <= TOL[dtype], ("few, split", err)


def test_int64_metadata_and_strided_q(device: torch.device) -> None:
    """Metadata as int64 and q as a view into a fused qkv buffer, for prefill and decode."""
    gen = torch.Generator().manual_seed(24)
    paged = make_paged([20, 5, 33], 2, 32, 16, torch.float32, device, gen)
    tables, lens = paged.block_tables.long(), paged.seq_lens.long()
    qkv = torch.randn((10, 8, 32), generator=gen).to(device)
    qsl = torch.tensor([0, 4, 9, 10], dtype=torch.int64, device=device)
    caches = (paged.key_cache, paged.value_cache)
    q = qkv[:, :4]
    ref = reference.paged_prefill_attention(q.cpu(), *[c.cpu() for c in caches],
                                            tables.cpu(), lens.cpu(), qsl.cpu(), 0.17)  # fmt: skip
    got = kernels.paged_prefill_attention(q, *caches, tables, lens, qsl, 0.17)
    assert rel_err(got.cpu(), ref) <= TOL[torch.float32]
    q = qkv[:3, :4]
    ref = reference.paged_decode_attention(q.cpu(), *[c.cpu() for c in caches],
                                           tables.cpu(), lens.cpu(), 0.17)  # fmt: skip
    got = kernels.paged_decode_attention(q, *caches, tables, lens, 0.17, num_splits=2)
    assert rel_err(got.cpu(), ref) <= TOL[torch.float32]
