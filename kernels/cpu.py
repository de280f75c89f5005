"""The CPU serving path: the same functions as kernels/reference.py, built on PyTorch's fused
`scaled_dot_product_attention` and `index_copy_` instead of the reference's explicit
matmul / mask / softmax, which costs several passes per layer on a CPU. The reference stays the
plain, obviously-right ground truth; tests/kernels/test_cpu_path.py holds this path to it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pagemesh.kernels import reference
from torch.nn.attention.bias import causal_lower_right


def write_kv_cache(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    if slot_mapping.numel() == 0 or int(slot_mapping.min()) < 0:
        # Padding slots: rare on CPU (no CUDA graphs pad batches), so the reference handles it.
        reference.write_kv_cache(key, value, key_cache, value_cache, slot_mapping)
        return
    num_kv_heads, head_dim = key_cache.shape[2], key_cache.shape[3]
    slots = slot_mapping.long()
    key_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slots, key.to(key_cache.dtype))
    value_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slots, value.to(value_cache.dtype))


def paged_attention(
    q: torch.Tensor,  # [T, Hq, D]
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    scale: float,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    num_heads, num_kv_heads = q.shape[1], key_cache.shape[2]
    block_size = key_cache.shape[1]
    if out is None:
        out = torch.empty_like(q)
    starts = query_start_loc.tolist()
    for b, seq_len in enumerate(seq_lens.tolist()):
        q_start, q_end = starts[b], starts[b + 1]
        q_len = q_end - q_start
        if q_len == 0:
            continue
        blocks = block_tables[b, : (seq_len + block_size - 1) // block_size].long()
        # 4-D [1, heads, len, dim] operands: only those reach PyTorch's fused CPU flash kernel;
        # 3-D ones fall back to the math path, ~14x slower on a 1k-token prefill.
        k = key_cache.index_select(0, blocks).flatten(0, 1)[:seq_len].transpose(0, 1)[None]
        v = value_cache.index_select(0, blocks).flatten(0, 1)[:seq_len].transpose(0, 1)[None]
        qb = q[q_start:q_end].transpose(0, 1)[None].to(k.dtype)
        group = num_heads // num_kv_heads
        if q_len == 1 or q_len == seq_len:
            # Decode sees the whole context; a cold prefill is plain causal.
            ob = F.scaled_dot_product_attention(
                qb, k, v, is_causal=q_len > 1, scale=scale, enable_gqa=group > 1
            )
        else:
            # New tokens after a cached prefix: causal aligned to the bottom-right corner.
            if group > 1:
                k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
            ob = F.scaled_dot_product_attention(
                qb, k, v, attn_mask=causal_lower_right(q_len, seq_len), scale=scale
            )
        ob = ob[0]
        out[q_start:q_end] = ob.transpose(0, 1).to(out.dtype)
    return out


# Below this many gathered key elements per layer (all sequences), the decode attention runs on
# one thread: waking the intra-op team costs more than it saves on so little work. Measured on the
# 2-core VM (SmolLM2-135M's 3 KV heads x 64, batch 1, 2 threads against 1): 59 -> 46 us at 64
# tokens, 100 -> 82 at 256, 142 -> 131 at 512, even at 1,024 (228 / 229) and 2 threads ahead at
# 2,048 (382 against 440); under load from other processes 2 threads cost several times more.
SERIAL_DECODE_ELEMENTS = 1 << 17


def paged_decode_attention(
    q: torch.Tensor,  # [B, Hq, D]: one query token per sequence
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per sequence, one SDPA over its gathered context, as few ops as can be: this runs once per
    layer per step, and at batch 1 its fixed costs are most of the attention's time.

    A sequence's query heads sharing one KV head go in as that head's query rows
    ([1, Hkv, group, D]): decode sees its whole context, so no mask, no GQA expansion, and the
    output [1, Hkv, group, D] is already the row's [Hq, D] layout (no transpose copy)."""
    num_kv_heads, head_dim = key_cache.shape[2], key_cache.shape[3]
    if out is None:
        out = torch.empty_like(q)
    lens = seq_lens.tolist()
    threads = torch.get_num_threads()
    serial = threads > 1 and sum(lens) * num_kv_heads * head_dim <= SERIAL_DECODE_ELEMENTS
    if serial:
        torch.set_num_threads(1)  # (this thread's setting: the engine's worker thread on CPU)
    try:
        _decode_rows(q, key_cache, value_cache, block_tables, lens, scale, out)
    finally:
        if serial:
            torch.set_num_threads(threads)
    return out


def _decode_rows(
    q: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: list[int],
    scale: float,
    out: torch.Tensor,
) -> None:
    num_heads, head_dim = q.shape[1], q.shape[2]
    num_kv_heads, block_size = key_cache.shape[2], key_cache.shape[1]
    group = num_heads // num_kv_heads
    # (an int32 table indexes index_select as it is: no cast per layer)
    for b, seq_len in enumerate(seq_lens):
        blocks = block_tables[b, : (seq_len + block_size - 1) // block_size]
        k = key_cache.index_select(0, blocks).flatten(0, 1)[:seq_len].transpose(0, 1)[None]
        v = value_cache.index_select(0, blocks).flatten(0, 1)[:seq_len].transpose(0, 1)[None]
        qb = q[b].reshape(1, num_kv_heads, group, head_dim).to(k.dtype)
        ob = F.scaled_dot_product_attention(qb, k, v, scale=scale)
        out[b].view(1, num_kv_heads, group, head_dim).copy_(ob)
