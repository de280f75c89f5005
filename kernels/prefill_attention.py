"""Paged prefill attention in Triton: packed new tokens of variable-length sequences attend
causally to themselves and to their cached prefix, all read from the paged cache.

Flash-attention tiling: a program owns BLOCK_M query tokens of one sequence and one query
head, and streams that sequence's keys/values in BLOCK_N-token tiles gathered through the
block table, keeping the softmax online. Keys before the tile's first query position are
visible to every row, so those tiles skip the causal mask; only the tiles that cross the
diagonal pay for it.

Programs map to (sequence, query tile) without a host sync: with tile_base(b) =
query_start_loc[b] // BLOCK_M + b, sequence b owns programs tile_base(b) ..
tile_base(b) + ceil(q_len_b / BLOCK_M) - 1, these ranges never overlap, and the grid of
T // BLOCK_M + B programs covers them all; each program finds its sequence by binary search
over query_start_loc. Programs past the end of their sequence's tiles exit at once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from pagemesh.kernels._triton_utils import cdiv, interpreting, next_pow2

LOG2E = 1.4426950408889634


@triton.jit
def _attend_tile(
    acc,
    m_i,
    l_i,
    q,
    k_cache_ptr,
    v_cache_ptr,
    bt_row,
    n0,
    q_pos,
    kv_end,
    kvh,
    scale_log2,
    stride_kb,
    stride_kt,
    stride_kh,
    stride_vb,
    stride_vt,
    stride_vh,
    offs_d,
    HEAD_DIM: tl.constexpr,
    HEAD_PAD: tl.constexpr,
    PAGE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    MASKED: tl.constexpr,
    F32_DOT: tl.constexpr,
):
    tok = n0 + tl.arange(0, BLOCK_N)
    n_mask = tok < kv_end
    if MASKED:
        page = tl.load(bt_row + tok // PAGE, mask=n_mask, other=0).to(tl.int64)
    else:
        page = tl.load(bt_row + tok // PAGE).to(tl.int64)
    row = tok % PAGE
    k_ptrs = k_cache_ptr + (page * stride_kb + row * stride_kt + kvh * stride_kh)[:, None]
    v_ptrs = v_cache_ptr + (page * stride_vb + row * stride_vt + kvh * stride_vh)[:, None]
    k_ptrs += offs_d[None, :]
    v_ptrs += offs_d[None, :]
    if MASKED or HEAD_PAD != HEAD_DIM:
        kv_mask = n_mask[:, None] & (offs_d[None, :] < HEAD_DIM)
        k = tl.load(k_ptrs, mask=kv_mask, other=0.0)
    else:
        k = tl.load(k_ptrs)
    if F32_DOT:
        s = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision="ieee")
    else:
        s = tl.dot(q.to(k.dtype), tl.trans(k))
    s = s * scale_log2
    if MASKED:
        visible = (tok[None, :] <= q_pos[:, None]) & n_mask[None, :]
        s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    # Rows with nothing visible yet keep m = -inf; keep their exponent finite (their p is 0).
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    if MASKED or HEAD_PAD != HEAD_DIM:
        v = tl.load(v_ptrs, mask=kv_mask, other=0.0)
    else:
        v = tl.load(v_ptrs)
    if F32_DOT:
        pv = tl.dot(p.to(v.dtype).to(tl.float32), v.to(tl.float32), input_precision="ieee")
    else:
        pv = tl.dot(p.to(v.dtype), v)
    acc = acc * alpha[:, None] + pv
    return acc, m_new, l_i


@triton.jit
def _prefill_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    block_tables_ptr,
    seq_lens_ptr,
    query_start_loc_ptr,
    out_ptr,
    scale_log2,
    num_seqs,
    stride_qt,
    stride_qh,
    stride_kb,
    stride_kt,
    stride_kh,
    stride_vb,
    stride_vt,
    stride_vh,
    stride_bt,
    stride_ot,
    stride_oh,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_PAD: tl.constexpr,
    PAGE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    F32_DOT: tl.constexpr,
    SKIP_SINGLE: tl.constexpr,
):
    pid = tl.program_id(0)
    h = tl.program_id(1)
    kvh = h // GROUP

    # Binary search: the last b with tile_base(b) <= pid.
    lo = tl.full([], 0, tl.int32)
    hi = tl.full([], 0, tl.int32) + num_seqs
    while hi - lo > 1:
        mid = (lo + hi) // 2
        base = tl.load(query_start_loc_ptr + mid) // BLOCK_M + mid
        if base <= pid:
            lo = mid
        else:
            hi = mid
    b = lo
    q_start = tl.load(query_start_loc_ptr + b)
    q_len = tl.load(query_start_loc_ptr + b + 1) - q_start
    m0 = (pid - (q_start // BLOCK_M + b)) * BLOCK_M
    if m0 >= q_len:
        return
    if SKIP_SINGLE:  # noqa: SIM102 (constexpr test, kept apart from the runtime one)
        if q_len == 1:
            return  # the decode kernel's (decode_rows=True)
    seq_len = tl.load(seq_lens_ptr + b)
    prefix = seq_len - q_len

    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_PAD)
    m_mask = offs_m < q_len
    if HEAD_PAD == HEAD_DIM:
        q_mask = m_mask[:, None]
    else:
        q_mask = m_mask[:, None] & (offs_d[None, :] < HEAD_DIM)
    rows = (q_start + offs_m).to(tl.int64)
    q = tl.load(
        q_ptr + rows[:, None] * stride_qt + h * stride_qh + offs_d[None, :], mask=q_mask, other=0.0
    )
    q_pos = prefix + offs_m

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_PAD], tl.float32)
    bt_row = block_tables_ptr + b.to(tl.int64) * stride_bt

    # Keys 0 .. prefix + m0 are visible to every row of the tile: whole tiles of them go
    # unmasked; the rest, up to the last row's position, go through the causal mask.
    full_end = (prefix + m0 + 1) // BLOCK_N * BLOCK_N
    kv_end = prefix + tl.minimum(m0 + BLOCK_M, q_len)
    for n0 in range(0, full_end, BLOCK_N):
        acc, m_i, l_i = _attend_tile(
            acc, m_i, l_i, q, k_cache_ptr, v_cache_ptr, bt_row, n0, q_pos, kv_end, kvh,
            scale_log2, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
            offs_d, HEAD_DIM, HEAD_PAD, PAGE, BLOCK_N, False, F32_DOT,
        )  # fmt: skip
    for n0 in range(full_end, kv_end, BLOCK_N):
        acc, m_i, l_i = _attend_tile(
            acc, m_i, l_i, q, k_cache_ptr, v_cache_ptr, bt_row, n0, q_pos, kv_end, kvh,
            scale_log2, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
            offs_d, HEAD_DIM, HEAD_PAD, PAGE, BLOCK_N, True, F32_DOT,
        )  # fmt: skip

    l_safe = tl.where(l_i > 0.0, l_i, 1.0)
    o = acc / l_safe[:, None]
    tl.store(
        out_ptr + rows[:, None] * stride_ot + h * stride_oh + offs_d[None, :],
        o.to(out_ptr.dtype.element_ty),
        mask=q_mask,
    )


def _launch_config(elem_size: int, head_pad: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages). For 16-bit heads up to 128, 64 x 64 tiles with
    4 warps. Long prefills run them as fast as 128 x 128 with 8 warps (batch 8, 1024 cached +
    1024 new on an H100: 322 against 328 TFLOP/s; benchmarks/RESULTS.md), and prefills of a
    few hundred tokens over a cached prefix much faster: a 170-token chunk fills two 128-row
    tiles a third, three 64-row tiles 90% (H200, serving steps of 47 such chunks over 1.2k
    cached tokens: 31.4 -> 20.9 ms of attention a 4-step window, the step 5% shorter). float32
    and larger heads take smaller tiles to stay inside shared memory and registers."""
    if interpreting():
        return 16, 16, 4, 1
    if elem_size >= 4 or head_pad > 128:
        return 64, 32, 4, 2
    return 64, 64, 4, 3


def paged_prefill_attention(
    q: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    scale: float,
    out: torch.Tensor | None = None,
    *,
    block_m: int | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    decode_rows: bool = False,
) -> torch.Tensor:
    """Triton paged prefill attention; same contract as
    kernels.reference.paged_prefill_attention.

    decode_rows: sequences with a one-token query (the decodes of a mixed step) go to the decode
    kernel instead. Here such a sequence would own a whole BLOCK_M-row tile for its one row and
    re-read its K/V once per query head; measured on an H200 in mixed steps of 8,192 tokens, a
    step's time grew from ~24 to ~50 ms as its decodes went from ~10 to ~200."""
    num_tokens, num_heads, head_dim = q.shape
    _, page, num_kv_heads, _ = key_cache.shape
    group = num_heads // num_kv_heads
    assert group * num_kv_heads == num_heads, "query heads must be a multiple of KV heads"
    assert q.stride(2) == 1 and key_cache.stride(3) == 1 and value_cache.stride(3) == 1
    if out is None:
        out = torch.empty_like(q)
    num_seqs = seq_lens.shape[0]
    if num_tokens == 0 or num_seqs == 0:
        return out
    head_pad = next_pow2(head_dim)
    bm, bn, warps, stages = _launch_config(key_cache.element_size(), head_pad)
    bm = block_m or bm
    bn = block_n or bn
    warps = num_warps or warps
    stages = num_stages or stages
    f32_dot = key_cache.dtype == torch.float32 or interpreting()  # see decode_attention
    if decode_rows:
        from pagemesh.kernels.decode_attention import paged_decode_attention

        paged_decode_attention(
            q, key_cache, value_cache, block_tables, seq_lens, scale, out,
            query_start_loc=query_start_loc,
        )  # fmt: skip
    grid = (cdiv(num_tokens, bm) + num_seqs, num_heads)
    _prefill_kernel[grid](
        q,
        key_cache,
        value_cache,
        block_tables,
        seq_lens,
        query_start_loc,
        out,
        scale * LOG2E,
        num_seqs,
        q.stride(0),
        q.stride(1),
        key_cache.stride(0),
        key_cache.stride(1),
        key_cache.stride(2),
        value_cache.stride(0),
        value_cache.stride(1),
        value_cache.stride(2),
        block_tables.stride(0),
        out.stride(0),
        out.stride(1),
        GROUP=group,
        HEAD_DIM=head_dim,
        HEAD_PAD=head_pad,
        PAGE=page,
        BLOCK_M=bm,
        BLOCK_N=bn,
        F32_DOT=f32_dot,
        SKIP_SINGLE=decode_rows,
        num_warps=warps,
        num_stages=stages,
    )
    return out


__all__ = ["paged_prefill_attention"]
