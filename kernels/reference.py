"""Pure-PyTorch references of every kernel: the ground truth of the kernel tests and the CPU
serving path. Same signatures as the Triton kernels (kernels/__init__.py dispatches).

Paged KV layout (per layer): key_cache and value_cache are
`[num_blocks, block_size, num_kv_heads, head_dim]`. A sequence's token at position p lives in
block `block_tables[b, p // block_size]`, row `p % block_size`. A slot is
`block_id * block_size + row`.

Attention metadata for a batch of B sequences with T new (query) tokens packed together:
- `query_start_loc` [B+1] int32: sequence b's new tokens are q[query_start_loc[b]:query_start_loc[b+1]]
- `seq_lens` [B] int32: the context length of sequence b including its new tokens; the new tokens
  sit at positions seq_len - q_len .. seq_len - 1 and attend causally to everything before them.
  Their K/V must already be written into the cache (write_kv_cache runs first).
"""

from __future__ import annotations

import torch


def write_kv_cache(
    key: torch.Tensor,  # [T, Hkv, D]
    value: torch.Tensor,  # [T, Hkv, D]
    key_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,  # [T] int64; negative = padding, skipped
) -> None:
    num_kv_heads, head_dim = key_cache.shape[2], key_cache.shape[3]
    valid = slot_mapping >= 0
    slots = slot_mapping[valid].long()
    key_cache.view(-1, num_kv_heads, head_dim)[slots] = key[valid].to(key_cache.dtype)
    value_cache.view(-1, num_kv_heads, head_dim)[slots] = value[valid].to(value_cache.dtype)


def copy_blocks(
    key_caches: list[torch.Tensor],
    value_caches: list[torch.Tensor],
    block_mapping: torch.Tensor,  # [N, 2] int64 (src, dst)
) -> None:
    if block_mapping.numel() == 0:
        return
    src = block_mapping[:, 0].long()
    dst = block_mapping[:, 1].long()
    for cache in (*key_caches, *value_caches):
        cache[dst] = cache[src]


def gather_kv(cache: torch.Tensor, block_table: torch.Tensor, seq_len: int) -> torch.Tensor:
    """The first seq_len tokens of one sequence, contiguous: [seq_len, Hkv, D]."""
    block_size = cache.shape[1]
    num_blocks = (seq_len + block_size - 1) // block_size
    blocks = cache[block_table[:num_blocks].long()]  # [nb, bs, Hkv, D]
    return blocks.reshape(-1, cache.shape[2], cache.shape[3])[:seq_len]


def paged_attention(
    q: torch.Tensor,  # [T, Hq, D]
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [B, max_blocks] int32
    seq_lens: torch.Tensor,  # [B] int32
    query_start_loc: torch.Tensor,  # [B+1] int32
    scale: float,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention of each sequence's new tokens over its whole paged context (GQA: query
    head h reads KV head h // (Hq // Hkv)). Computed in float32."""
    num_heads = q.shape[1]
    num_kv_heads = key_cache.shape[2]
    group = num_heads // num_kv_heads
    if out is None:
        out = torch.empty_like(q)
    starts = query_start_loc.tolist()
    lens = seq_lens.tolist()
    for b, seq_len in enumerate(lens):
        q_start, q_end = starts[b], starts[b + 1]
        q_len = q_end - q_start
        if q_len == 0:
            continue
        k = gather_kv(key_cache, block_tables[b], seq_len).float()  # [L, Hkv, D]
        v = gather_kv(value_cache, block_tables[b], seq_len).float()
        qb = q[q_start:q_end].float()  # [q_len, Hq, D]
        # [Hkv, group, q_len, D] x [Hkv, D, L] -> [Hkv, group, q_len, L]
        qg = qb.view(q_len, num_kv_heads, group, -1).permute(1, 2, 0, 3)
        scores = torch.matmul(qg, k.permute(1, 2, 0).unsqueeze(1)) * scale
        q_pos = torch.arange(seq_len - q_len, seq_len).view(-1, 1)
        k_pos = torch.arange(seq_len).view(1, -1)
        scores = scores.masked_fill(k_pos > q_pos, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        ob = torch.matmul(probs, v.permute(1, 0, 2).unsqueeze(1))  # [Hkv, group, q_len, D]
        out[q_start:q_end] = ob.permute(2, 0, 1, 3).reshape(q_len, num_heads, -1).to(out.dtype)
    return out


def paged_decode_attention(
    q: torch.Tensor,  # [B, Hq, D]: one new token per sequence
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    batch = q.shape[0]
    query_start_loc = torch.arange(batch + 1, dtype=torch.int32)
    return paged_attention(
        q, key_cache, value_cache, block_tables, seq_lens, query_start_loc, scale, out
    )


def paged_prefill_attention(
    q: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    scale: float,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    return paged_attention(
        q, key_cache, value_cache, block_tables, seq_lens, query_start_loc, scale, out
    )


def apply_token_bitmask(
    logits: torch.Tensor, bitmask: torch.Tensor, rows: torch.Tensor | None, vocab_size: int
) -> None:
    """Structured output: in place, the logits a mask row disallows to -inf (kernels/
    token_mask.py describes the layout); columns at or past `vocab_size` are disallowed."""
    c, n = bitmask.shape[0], logits.shape[1]
    if c == 0:
        return
    shifts = torch.arange(32, dtype=torch.int32, device=bitmask.device)
    bits = ((bitmask.unsqueeze(-1) >> shifts) & 1).view(c, -1).bool()
    allowed = torch.zeros(c, n, dtype=torch.bool, device=logits.device)
    width = min(n, vocab_size, bits.shape[1])
    allowed[:, :width] = bits[:, :width]
    if rows is None:
        logits.masked_fill_(~allowed, float("-inf"))
    else:
        logits[rows] = logits[rows].masked_fill(~allowed, float("-inf"))
