"""Structured output's token masks applied to a step's logits, in one Triton kernel.

A mask row is xgrammar's packed bitmask (int32 words, bit j of word w allows token 32 * w + j).
`rows` maps mask row i to the logits row it applies to (None: mask row i is logits row i), so
only the constrained rows of a batch are uploaded and touched. Columns at or past `vocab_size`
(the logits' padding) are disallowed too. The reference (kernels/reference.py) is the same
operation in PyTorch; this is the CUDA path (one launch, no host-side indexing).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Columns per program: 4096 is 128 mask words, one coalesced load, and 12 programs per row of
# a 49k vocabulary.
BLOCK = 4096


@triton.jit
def _apply_token_bitmask_kernel(
    logits_ptr,
    bitmask_ptr,
    rows_ptr,
    vocab_size,
    num_cols,
    stride_logits,
    stride_bitmask,
    HAS_ROWS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    i = tl.program_id(0)  # mask row
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    if HAS_ROWS:
        row = tl.load(rows_ptr + i).to(tl.int64)
    else:
        row = i.to(tl.int64)
    in_vocab = cols < vocab_size
    words = tl.load(bitmask_ptr + i.to(tl.int64) * stride_bitmask + cols // 32, in_vocab, other=0)
    refused = ((words >> (cols % 32)) & 1) == 0  # (past the vocabulary: a 0 word, refused)
    tl.store(logits_ptr + row * stride_logits + cols, -float("inf"), (cols < num_cols) & refused)


def apply_token_bitmask(
    logits: torch.Tensor, bitmask: torch.Tensor, rows: torch.Tensor | None, vocab_size: int
) -> None:
    c = bitmask.shape[0]
    if c == 0:
        return
    assert bitmask.dtype == torch.int32 and bitmask.stride(1) == 1
    assert logits.stride(1) == 1
    n = logits.shape[1]
    grid = (c, triton.cdiv(n, BLOCK))
    _apply_token_bitmask_kernel[grid](
        logits,
        bitmask,
        rows if rows is not None else bitmask,  # (not read without HAS_ROWS)
        vocab_size,
        n,
        logits.stride(0),
        bitmask.stride(0),
        HAS_ROWS=rows is not None,
        BLOCK=BLOCK,
        num_warps=4,
    )
