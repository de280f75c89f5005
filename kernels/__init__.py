"""Paged-attention kernels. Triton on CUDA tensors, the CPU path (kernels/cpu.py: the same
functions on PyTorch's fused SDPA) elsewhere, the plain reference when asked for.

The public functions below dispatch on the device of their inputs; every implementation shares
the signatures and the layout documented in kernels/reference.py. Set PAGEMESH_KERNELS=triton
to force the Triton kernels (with TRITON_INTERPRET=1 they run on CPU tensors, which is how the
kernel tests reach them) or PAGEMESH_KERNELS=reference to force the reference.

The Triton modules are imported on first use, so CPU-only callers never import Triton.
"""

from __future__ import annotations

from typing import Any

import torch
from pagemesh.kernels import cpu, reference
from pagemesh.kernels._triton_utils import use_reference, use_triton
from pagemesh.kernels.reference import paged_attention


def paged_decode_attention(
    q: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    out: torch.Tensor | None = None,
    **kwargs: Any,
) -> torch.Tensor:
    """One query token per sequence. Optional kwargs (Triton path only): max_seq_len (host-side
    bound of seq_lens, sizes the context split), num_splits, block_n, num_warps, num_stages."""
    if use_triton(q):
        from pagemesh.kernels import decode_attention

        return decode_attention.paged_decode_attention(
            q, key_cache, value_cache, block_tables, seq_lens, scale, out, **kwargs
        )
    impl = reference if use_reference() else cpu
    return impl.paged_decode_attention(
        q, key_cache, value_cache, block_tables, seq_lens, scale, out
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
    **kwargs: Any,
) -> torch.Tensor:
    """Packed new tokens attend causally to themselves and their cached prefix. Optional
    kwargs (Triton path only): block_m, block_n, num_warps, num_stages."""
    if use_triton(q):
        from pagemesh.kernels import prefill_attention

        return prefill_attention.paged_prefill_attention(
            q,
            key_cache,
            value_cache,
            block_tables,
            seq_lens,
            query_start_loc,
            scale,
            out,
            **kwargs,
        )
    impl = reference if use_reference() else cpu
    return impl.paged_attention(
        q, key_cache, value_cache, block_tables, seq_lens, query_start_loc, scale, out
    )


def write_kv_cache(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    if use_triton(key_cache):
        from pagemesh.kernels import cache_ops

        cache_ops.write_kv_cache(key, value, key_cache, value_cache, slot_mapping)
        return
    impl = reference if use_reference() else cpu
    impl.write_kv_cache(key, value, key_cache, value_cache, slot_mapping)


def copy_blocks(
    key_caches: list[torch.Tensor],
    value_caches: list[torch.Tensor],
    block_mapping: torch.Tensor,
) -> None:
    caches = [*key_caches, *value_caches]
    if caches and use_triton(caches[0]):
        from pagemesh.kernels import cache_ops

        cache_ops.copy_blocks(key_caches, value_caches, block_mapping.to(caches[0].device))
        return
    reference.copy_blocks(key_caches, value_caches, block_mapping)


def apply_token_bitmask(
    logits: torch.Tensor, bitmask: torch.Tensor, rows: torch.Tensor | None, vocab_size: int
) -> None:
    """Structured output: the logits that the packed mask rows `bitmask` [C, ceil(V / 32)]
    int32 disallow to -inf, in place; mask row i applies to logits row rows[i] (None: row i).
    Columns at or past `vocab_size` are disallowed (padding). One kernel on CUDA."""
    if use_triton(logits):
        from pagemesh.kernels import token_mask

        token_mask.apply_token_bitmask(logits, bitmask, rows, vocab_size)
        return
    reference.apply_token_bitmask(logits, bitmask, rows, vocab_size)


__all__ = [
    "apply_token_bitmask",
    "copy_blocks",
    "paged_attention",
    "paged_decode_attention",
    "paged_prefill_attention",
    "write_kv_cache",
]
