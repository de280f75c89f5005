"""The weights' memory layout for single-stream decode on the CPU.

A decode step at batch 1 is a matrix-vector product per weight, bound by how fast the weight
streams from memory. MKL's product (what `F.linear` calls on CPU) streams a weight whose
output dimension is the wider one about twice as fast when the weight is stored column-major
(its transpose contiguous, `[in, out]` in memory) as when it is stored row-major, PyTorch's
default: measured on the 2-core AVX-512 VM, torch 2.13 (MKL 2024.2), 2 threads, float32,
one row in, each layout timed in turn:

    weight [out, in]     row-major   column-major
    49152 x 576 (logits)  9.84 ms      4.84 ms
     3072 x 576 (gate_up)  631 us       331 us
      960 x 576 (qkv)      201 us       140 us
      576 x 576 (o_proj)   122 us       107 us
      576 x 1536 (down)    224 us       269 us   (narrower output: row-major stays)
    16384 x 2048          7.67 ms      6.18 ms
     2048 x 8192          3.11 ms      3.19 ms

So a weight whose output is at least as wide as its input is stored column-major: the same
values and shape, `weight.t()` contiguous, which `F.linear` takes as is (it multiplies by
`weight.t()`). Batches of 8 rows and more go through the matrix-matrix kernel, which takes
either layout at the same speed (measured from 8 to 512 rows), so prefill is unchanged. The
only cost: an embedding whose weight is also the logits' (tied) gathers its rows strided, a few
microseconds per decode token, ~2x a long prompt's few milliseconds.

The products' sums are ordered differently, so logits move in their last bits (as with any other
BLAS); greedy outputs are held to transformers' by tests/executor/.
"""

from __future__ import annotations

import torch
from torch import nn


def wants_column_major(weight: torch.Tensor) -> bool:
    """A float32 [out, in] weight whose output is at least as wide as its input (the table)."""
    return (
        weight.dim() == 2 and weight.dtype == torch.float32 and weight.shape[0] >= weight.shape[1]
    )


def to_column_major(weight: torch.Tensor) -> torch.Tensor:
    """The same values and shape, stored transposed (already so: returned as is)."""
    if weight.stride() == (1, weight.shape[0]):
        return weight
    return weight.t().contiguous().t()


def use_cpu_decode_layout(model: nn.Module) -> int:
    """Re-store in place every Linear weight (and the tied embedding, which computes the
    logits) that streams faster column-major on CPU. Returns how many were re-stored."""
    count = 0
    for module in model.modules():
        if isinstance(module, nn.Linear | nn.Embedding) and module.weight.device.type == "cpu":
            weight = module.weight
            if isinstance(module, nn.Embedding) and not _computes_logits(model, module):
                continue
            if wants_column_major(weight) and weight.is_contiguous():
                module.weight = nn.Parameter(to_column_major(weight.data), requires_grad=False)
                count += 1
    return count


def _computes_logits(model: nn.Module, embedding: nn.Embedding) -> bool:
    """A tied embedding: its weight is also the logits' (LlamaForCausalLM.lm_head is None)."""
    return getattr(model, "lm_head", False) is None and embedding is getattr(
        getattr(model, "model", None), "embed_tokens", None
    )
