"""Paged decode attention in Triton: one query token per sequence over its paged KV.

Work split. One program handles (KV head, sequence, context split): it loads the query rows of
every query head that shares that KV head (GQA, any ratio: MHA is a group of 1, MQA one group
of all heads), so each K/V byte is read from memory once per step, not once per query head.
The group is padded to 16 rows because tensor-core dots need M >= 16; the padding costs
arithmetic only, and decode is bound by memory, not arithmetic.

Split-K. A batch of few sequences has too few (KV head, sequence) pairs to fill the GPU, so
the context is cut into `num_splits` slices, each reduced to a partial (max, sum, weighted V)
in float32, and a second small kernel merges the slices (log-sum-exp rescaling; merging in the
last slice to finish instead, `fused_merge=True`, measured no faster). The split is
chosen on the host from static shapes only (batch, KV heads, the block table's width, SM
count): reading seq_lens would force a device sync and break CUDA-graph capture.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from pagemesh.kernels._triton_utils import cdiv, interpreting, next_pow2, num_sms

LOG2E = 1.4426950408889634

# A split slice is never shorter than this many tokens: below it the partial results (written
# and re-read in float32) and the merge kernel cost more than the extra parallelism buys.
MIN_TOKENS_PER_SPLIT = 256
# Aim for about this many (KV head, sequence, slice) programs per SM: enough resident programs
# with loads in flight to hide memory latency. Measured on an H100 (benchmarks/RESULTS.md):
# batch 64 x 8 KV heads (3.9 programs per SM unsplit) ran best unsplit with uniform lengths
# (92% of the read ceiling against 87-89% with 2 slices), while batch 8 needs ~8 slices.
# Ragged batches would like more slices (better balance), but the split is chosen from static
# shapes only, so uniform batches decide.
PROGRAMS_PER_SM = 3
# The merge holds [slices, head dim] float32 partials in registers: cap the slices there.
MAX_SPLITS = 64
# Merge the slices inside the decode kernel (the last slice of each (sequence, KV head) to
# finish merges) rather than in a second kernel. See benchmarks/RESULTS.md for both measured.
FUSED_MERGE_DEFAULT = False


@triton.jit
def _decode_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    block_tables_ptr,
    seq_lens_ptr,
    query_start_loc_ptr,
    out_ptr,
    part_acc_ptr,
    part_ml_ptr,
    counters_ptr,
    scale_log2,
    tokens_per_split,
    stride_qb,
    stride_qh,
    stride_kb,
    stride_kt,
    stride_kh,
    stride_vb,
    stride_vt,
    stride_vh,
    stride_bt,
    stride_ob,
    stride_oh,
    num_heads,
    GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_PAD: tl.constexpr,
    PAGE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    NUM_KV_HEADS: tl.constexpr,
    FUSED_MERGE: tl.constexpr,
    SPLIT_PAD: tl.constexpr,
    MERGE_UNROLL: tl.constexpr,
    F32_DOT: tl.constexpr,
    MIXED: tl.constexpr,
):
    kvh = tl.program_id(0)
    b = tl.program_id(1)
    split = tl.program_id(2)

    if MIXED:
        # A packed prefill batch: sequence b's query is row query_start_loc[b], and only
        # one-token queries are ours (the prefill kernel skips them and does the rest).
        q_row = tl.load(query_start_loc_ptr + b)
        if tl.load(query_start_loc_ptr + b + 1) - q_row != 1:
            return
    else:
        q_row = b
    seq_len = tl.load(seq_lens_ptr + b)
    start = split * tokens_per_split
    if NUM_SPLITS > 1:  # noqa: SIM102 (constexpr test, kept apart from the runtime one)
        # Slices past the end have nothing to do; the merge never reads their rows. Slice 0
        # always runs, so that a sequence of length 0 still gets its output (zeros) written.
        if (split > 0) & (start >= seq_len):
            return
    end = tl.minimum(start + tokens_per_split, seq_len)

    offs_g = tl.arange(0, GROUP_PAD)
    offs_d = tl.arange(0, HEAD_PAD)
    offs_n = tl.arange(0, BLOCK_N)
    heads = kvh * GROUP + offs_g
    g_mask = offs_g < GROUP
    if HEAD_PAD == HEAD_DIM:
        qd_mask = g_mask[:, None]
    else:
        qd_mask = g_mask[:, None] & (offs_d[None, :] < HEAD_DIM)
    q = tl.load(
        q_ptr + q_row * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
        mask=qd_mask,
        other=0.0,
    )

    m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_PAD], tl.float32)
    bt_row = block_tables_ptr + b.to(tl.int64) * stride_bt

    for n0 in range(start, end, BLOCK_N):
        tok = n0 + offs_n
        n_mask = tok < end
        page = tl.load(bt_row + tok // PAGE, mask=n_mask, other=0).to(tl.int64)
        row = tok % PAGE
        if HEAD_PAD == HEAD_DIM:
            kv_mask = n_mask[:, None]
        else:
            kv_mask = n_mask[:, None] & (offs_d[None, :] < HEAD_DIM)
        k_off = page * stride_kb + row * stride_kt + kvh * stride_kh
        k = tl.load(k_cache_ptr + k_off[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)
        if F32_DOT:
            s = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision="ieee")
        else:
            s = tl.dot(q.to(k.dtype), tl.trans(k))
        s = tl.where(n_mask[None, :], s * scale_log2, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v_off = page * stride_vb + row * stride_vt + kvh * stride_vh
        v = tl.load(v_cache_ptr + v_off[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)
        if F32_DOT:
            # Round p as the 16-bit path does, so both paths compute the same function.
            pv = tl.dot(p.to(v.dtype).to(tl.float32), v.to(tl.float32), input_precision="ieee")
        else:
            pv = tl.dot(p.to(v.dtype), v)
        acc = acc * alpha[:, None] + pv
        m_i = m_new

    if NUM_SPLITS == 1:
        # seq_len 0 (a padding row of a captured batch) leaves l_i at 0: write zeros, not NaN.
        l_safe = tl.where(l_i > 0.0, l_i, 1.0)
        o = acc / l_safe[:, None]
        tl.store(
            out_ptr + q_row * stride_ob + heads[:, None] * stride_oh + offs_d[None, :],
            o.to(out_ptr.dtype.element_ty),
            mask=qd_mask,
        )
    else:
        # Partials: [B, Hq, NUM_SPLITS, HEAD_PAD] and [B, Hq, NUM_SPLITS, 2] (max in log2
        # units, sum), contiguous.
        row_id = (b * num_heads + heads).to(tl.int64) * NUM_SPLITS + split
        tl.store(
            part_acc_ptr + row_id[:, None] * HEAD_PAD + offs_d[None, :],
            acc,
            mask=g_mask[:, None],
        )
        tl.store(part_ml_ptr + row_id * 2, m_i, mask=g_mask)
        tl.store(part_ml_ptr + row_id * 2 + 1, l_i, mask=g_mask)
        if FUSED_MERGE:
            # The last slice of this (sequence, KV head) to finish merges all of them, which
            # saves the merge kernel's launch and its gap (a large share of the time of a
            # small, latency-bound batch). The barrier orders every thread's partial stores
            # before the counter update (acq_rel at GPU scope publishes them to the merging
            # program); the merging program reads them through L2 (.cg), never a stale L1.
            n_active = tl.maximum(tl.cdiv(seq_len, tokens_per_split), 1)
            counter = counters_ptr + b * NUM_KV_HEADS + kvh
            tl.debug_barrier()
            done = tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu")
            if done == n_active - 1:
                tl.store(counter, 0)  # self-resetting: ready for the next launch (or replay)
                # Weights of all slices at once ([group, slices]: a few KB), then the partial
                # outputs MERGE_UNROLL slices per step with independent loads, so the merge
                # costs a few L2 round trips rather than one per slice (a serial loop measured
                # slower than the separate merge kernel).
                row0 = (b * num_heads + heads).to(tl.int64) * NUM_SPLITS
                offs_s = tl.arange(0, SPLIT_PAD)
                gs_mask = g_mask[:, None] & (offs_s[None, :] < n_active)
                ml = part_ml_ptr + (row0[:, None] + offs_s[None, :]) * 2
                m_s = tl.load(ml, mask=gs_mask, other=float("-inf"), cache_modifier=".cg")
                l_s = tl.load(ml + 1, mask=gs_mask, other=0.0, cache_modifier=".cg")
                m_max = tl.max(m_s, 1)
                # Padding rows and empty slices have m = -inf: keep the exponents finite.
                m_max = tl.where(m_max == float("-inf"), 0.0, m_max)
                w = tl.where(gs_mask, tl.exp2(m_s - m_max[:, None]), 0.0)
                l_all = tl.sum(w * l_s, 1)
                o_all = tl.zeros([GROUP_PAD, HEAD_PAD], tl.float32)
                for s0 in range(0, n_active, MERGE_UNROLL):
                    for j in tl.static_range(MERGE_UNROLL):
                        sp = s0 + j
                        w_s = tl.sum(tl.where(offs_s[None, :] == sp, w, 0.0), 1)
                        a_s = tl.load(
                            part_acc_ptr + (row0 + sp)[:, None] * HEAD_PAD + offs_d[None, :],
                            # Rows of the group, none when sp is past the last active slice.
                            mask=offs_g[:, None] < tl.where(sp < n_active, GROUP, 0),
                            other=0.0,
                            cache_modifier=".cg",
                        )
                        o_all += a_s * w_s[:, None]
                l_safe = tl.where(l_all > 0.0, l_all, 1.0)
                tl.store(
                    out_ptr + q_row * stride_ob + heads[:, None] * stride_oh + offs_d[None, :],
                    (o_all / l_safe[:, None]).to(out_ptr.dtype.element_ty),
                    mask=qd_mask,
                )


@triton.jit
def _merge_kernel(
    part_acc_ptr,
    part_ml_ptr,
    seq_lens_ptr,
    query_start_loc_ptr,
    out_ptr,
    tokens_per_split,
    stride_ob,
    stride_oh,
    num_heads,
    HEAD_DIM: tl.constexpr,
    HEAD_PAD: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    SPLIT_PAD: tl.constexpr,
    MIXED: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    if MIXED:  # as in _decode_kernel: only one-token queries, at their packed row
        q_row = tl.load(query_start_loc_ptr + b)
        if tl.load(query_start_loc_ptr + b + 1) - q_row != 1:
            return
    else:
        q_row = b
    seq_len = tl.load(seq_lens_ptr + b)
    n_active = tl.maximum(tl.cdiv(seq_len, tokens_per_split), 1)
    offs_s = tl.arange(0, SPLIT_PAD)
    offs_d = tl.arange(0, HEAD_PAD)
    s_mask = offs_s < n_active
    row0 = (b * num_heads + h).to(tl.int64) * NUM_SPLITS
    m = tl.load(part_ml_ptr + (row0 + offs_s) * 2, mask=s_mask, other=float("-inf"))
    l_s = tl.load(part_ml_ptr + (row0 + offs_s) * 2 + 1, mask=s_mask, other=0.0)
    m_max = tl.max(m, 0)
    m_max = tl.where(m_max == float("-inf"), 0.0, m_max)  # only empty slices (length 0)
    w = tl.where(s_mask, tl.exp2(m - m_max), 0.0)
    acc = tl.load(
        part_acc_ptr + (row0 + offs_s)[:, None] * HEAD_PAD + offs_d[None, :],
        mask=s_mask[:, None],
        other=0.0,
    )
    num = tl.sum(acc * w[:, None], 0)
    den = tl.sum(l_s * w, 0)
    den = tl.where(den > 0.0, den, 1.0)
    tl.store(
        out_ptr + q_row * stride_ob + h * stride_oh + offs_d,
        (num / den).to(out_ptr.dtype.element_ty),
        mask=offs_d < HEAD_DIM,
    )


# Arrival counters of the fused merge, one per (sequence, KV head), zero between launches (the
# merging program resets its own). Allocated once per device outside any graph capture:
# 64K counters cover batch x KV heads of any real model; a larger call gets fresh zeros.
_COUNTERS: dict[torch.device, torch.Tensor] = {}
_NUM_COUNTERS = 1 << 16


def _counters(device: torch.device, needed: int) -> torch.Tensor:
    if needed > _NUM_COUNTERS:
        return torch.zeros(needed, dtype=torch.int32, device=device)
    buf = _COUNTERS.get(device)
    if buf is None:
        buf = _COUNTERS[device] = torch.zeros(_NUM_COUNTERS, dtype=torch.int32, device=device)
    return buf


def choose_num_splits(batch: int, num_kv_heads: int, max_context: int, device: torch.device) -> int:
    """Slices per sequence: enough (KV head, sequence, slice) programs to give every SM
    PROGRAMS_PER_SM of them, but no slice under MIN_TOKENS_PER_SPLIT tokens. Large batches get
    1 (no merge pass at all)."""
    pairs = max(1, batch * num_kv_heads)
    want = cdiv(PROGRAMS_PER_SM * num_sms(device), pairs)
    cap = max(1, max_context // MIN_TOKENS_PER_SPLIT)
    return max(1, min(want, cap, MAX_SPLITS))


def _launch_config(elem_size: int, head_pad: int, slice_tokens: int) -> tuple[int, int, int]:
    """(BLOCK_N, num_warps, num_stages). A 64-token tile of 16-bit K and V at head dim 128 is
    2 x 16 KB per stage; three stages keep enough loads in flight per program on Hopper. Short
    slices (a small batch split many ways) spend most of their time filling the pipeline:
    32-token tiles five stages deep issue the same bytes sooner (batch 1 x 8192 tokens on an
    H100: 53% of the read ceiling against 46-49% with 64 x 3)."""
    if interpreting():
        return 16, 4, 1
    if elem_size >= 4 or head_pad > 128:
        return 32, 4, 2
    if slice_tokens <= 256:
        return 32, 4, 5
    return 64, 4, 3


def paged_decode_attention(
    q: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    out: torch.Tensor | None = None,
    *,
    max_seq_len: int | None = None,
    num_splits: int | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    fused_merge: bool = FUSED_MERGE_DEFAULT,
    query_start_loc: torch.Tensor | None = None,
) -> torch.Tensor:
    """Triton paged decode attention; same contract as kernels.reference.paged_decode_attention.

    max_seq_len: an upper bound of seq_lens known on the host (defaults to the block table's
    capacity); it only sizes the split. num_splits/block_n/num_warps/num_stages override the
    heuristics (benchmarks sweep them). fused_merge=False merges the slices in a second kernel
    instead of in the last slice to finish (calls that share the counters must not run
    concurrently on two streams).

    query_start_loc: q is a packed prefill batch (kernels.reference.paged_attention's layout)
    instead of one row per sequence; only the sequences with a one-token query get their row
    of `out` written (paged_prefill_attention with decode_rows=True does the others)."""
    _, num_heads, head_dim = q.shape
    batch = seq_lens.shape[0]
    mixed = query_start_loc is not None
    _, page, num_kv_heads, _ = key_cache.shape
    group = num_heads // num_kv_heads
    assert group * num_kv_heads == num_heads, "query heads must be a multiple of KV heads"
    assert q.stride(2) == 1 and key_cache.stride(3) == 1 and value_cache.stride(3) == 1
    if out is None:
        out = torch.empty_like(q)
    if batch == 0:
        return out
    head_pad = next_pow2(head_dim)
    group_pad = max(16, next_pow2(group))
    max_context = max_seq_len if max_seq_len is not None else block_tables.shape[1] * page
    max_context = max(1, max_context)
    splits = num_splits or choose_num_splits(batch, num_kv_heads, max_context, q.device)
    bn, warps, stages = _launch_config(
        key_cache.element_size(), head_pad, cdiv(max_context, splits)
    )
    bn = block_n or bn
    warps = num_warps or warps
    stages = num_stages or stages
    tokens_per_split = cdiv(cdiv(max_context, splits), bn) * bn
    splits = cdiv(max_context, tokens_per_split)

    if splits > 1:
        part_acc = torch.empty(
            (batch, num_heads, splits, head_pad), dtype=torch.float32, device=q.device
        )
        part_ml = torch.empty((batch, num_heads, splits, 2), dtype=torch.float32, device=q.device)
    else:
        part_acc = part_ml = out  # unused
    fused = fused_merge and splits > 1 and not mixed
    counters = _counters(q.device, batch * num_kv_heads) if fused else seq_lens  # else unused
    # float32 caches get exact (IEEE) dots: Triton's default for float32 is tf32, far from the
    # 1e-5 the tests ask. The interpreter's bfloat16 dot is broken (Triton 3.9 + NumPy), so
    # under the interpreter 16-bit operands are upcast before the dot as well.
    f32_dot = key_cache.dtype == torch.float32 or interpreting()
    _decode_kernel[(num_kv_heads, batch, splits)](
        q,
        key_cache,
        value_cache,
        block_tables,
        seq_lens,
        query_start_loc if mixed else seq_lens,  # unused unless mixed
        out,
        part_acc,
        part_ml,
        counters,
        scale * LOG2E,
        tokens_per_split,
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
        num_heads,
        GROUP=group,
        GROUP_PAD=group_pad,
        HEAD_DIM=head_dim,
        HEAD_PAD=head_pad,
        PAGE=page,
        BLOCK_N=bn,
        NUM_SPLITS=splits,
        NUM_KV_HEADS=num_kv_heads,
        FUSED_MERGE=fused,
        SPLIT_PAD=next_pow2(splits),
        MERGE_UNROLL=4,
        F32_DOT=f32_dot,
        MIXED=mixed,
        num_warps=warps,
        num_stages=stages,
    )
    if splits > 1 and not fused:
        _merge_kernel[(batch, num_heads)](
            part_acc,
            part_ml,
            seq_lens,
            query_start_loc if mixed else seq_lens,
            out,
            tokens_per_split,
            out.stride(0),
            out.stride(1),
            num_heads,
            HEAD_DIM=head_dim,
            HEAD_PAD=head_pad,
            NUM_SPLITS=splits,
            SPLIT_PAD=next_pow2(splits),
            MIXED=mixed,
            num_warps=4,
        )
    return out


__all__ = ["choose_num_splits", "paged_decode_attention"]
