"""KV cache write through a slot mapping, and block copies for copy-on-write, in Triton."""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from pagemesh.kernels import reference
from pagemesh.kernels._triton_utils import next_pow2


@triton.jit
def _write_kv_kernel(
    key_ptr,
    value_ptr,
    key_cache_ptr,
    value_cache_ptr,
    slot_ptr,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_kcb,
    stride_kct,
    stride_kch,
    stride_vcb,
    stride_vct,
    stride_vch,
    NUM_KV_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEADS_PAD: tl.constexpr,
    HEAD_PAD: tl.constexpr,
    PAGE: tl.constexpr,
):
    # One program per new token: all its KV heads at once (a [Hkv, D] tile, a few KB).
    t = tl.program_id(0)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot < 0:  # padding token of a captured batch: nothing to write
        return
    block = slot // PAGE
    row = slot % PAGE
    offs_h = tl.arange(0, HEADS_PAD)
    offs_d = tl.arange(0, HEAD_PAD)
    mask = (offs_h[:, None] < NUM_KV_HEADS) & (offs_d[None, :] < HEAD_DIM)
    t64 = t.to(tl.int64)
    k = tl.load(
        key_ptr + t64 * stride_kt + offs_h[:, None] * stride_kh + offs_d[None, :], mask=mask
    )
    v = tl.load(
        value_ptr + t64 * stride_vt + offs_h[:, None] * stride_vh + offs_d[None, :], mask=mask
    )
    kc = key_cache_ptr + block * stride_kcb + row * stride_kct
    vc = value_cache_ptr + block * stride_vcb + row * stride_vct
    tl.store(
        kc + offs_h[:, None] * stride_kch + offs_d[None, :],
        k.to(key_cache_ptr.dtype.element_ty),
        mask=mask,
    )
    tl.store(
        vc + offs_h[:, None] * stride_vch + offs_d[None, :],
        v.to(value_cache_ptr.dtype.element_ty),
        mask=mask,
    )


def write_kv_cache(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Triton version of kernels.reference.write_kv_cache (negative slots are skipped)."""
    num_tokens = key.shape[0]
    if num_tokens == 0:
        return
    _, page, num_kv_heads, head_dim = key_cache.shape
    assert key.stride(2) == 1 and value.stride(2) == 1
    assert key_cache.stride(3) == 1 and value_cache.stride(3) == 1
    _write_kv_kernel[(num_tokens,)](
        key,
        value,
        key_cache,
        value_cache,
        slot_mapping,
        key.stride(0),
        key.stride(1),
        value.stride(0),
        value.stride(1),
        key_cache.stride(0),
        key_cache.stride(1),
        key_cache.stride(2),
        value_cache.stride(0),
        value_cache.stride(1),
        value_cache.stride(2),
        NUM_KV_HEADS=num_kv_heads,
        HEAD_DIM=head_dim,
        HEADS_PAD=next_pow2(num_kv_heads),
        HEAD_PAD=next_pow2(head_dim),
        PAGE=page,
        num_warps=4,
    )


@triton.jit
def _copy_blocks_kernel(
    cache_ptr,
    mapping_ptr,
    block_numel,
    stride_block,
    BLOCK: tl.constexpr,
):
    # Program (pair, chunk): copies BLOCK elements of block src into block dst.
    pair = tl.program_id(0)
    chunk = tl.program_id(1)
    src = tl.load(mapping_ptr + pair * 2).to(tl.int64)
    dst = tl.load(mapping_ptr + pair * 2 + 1).to(tl.int64)
    offs = chunk * BLOCK + tl.arange(0, BLOCK)
    mask = offs < block_numel
    x = tl.load(cache_ptr + src * stride_block + offs, mask=mask)
    tl.store(cache_ptr + dst * stride_block + offs, x, mask=mask)


def copy_blocks(
    key_caches: list[torch.Tensor],
    value_caches: list[torch.Tensor],
    block_mapping: torch.Tensor,
) -> None:
    """Triton version of kernels.reference.copy_blocks: cache[dst] = cache[src] for every
    (src, dst) row, in every layer's K and V. One launch per cache tensor: copy-on-write is
    rare (the first write into a shared partial block), so launch count does not matter."""
    if block_mapping.numel() == 0:
        return
    mapping = block_mapping.contiguous()
    for cache in (*key_caches, *value_caches):
        block_numel = cache[0].numel()
        if not cache[0].is_contiguous():
            reference.copy_blocks([cache], [], mapping)
            continue
        block = min(4096, next_pow2(block_numel))
        grid = (mapping.shape[0], triton.cdiv(block_numel, block))
        _copy_blocks_kernel[grid](cache, mapping, block_numel, cache.stride(0), BLOCK=block)


__all__ = ["copy_blocks", "write_kv_cache"]
