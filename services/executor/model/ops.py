"""The model's elementwise ops, written once in plain PyTorch with transformers' numerics.

On CUDA each op is compiled with torch.compile into one fused Triton kernel: a small model's
decode step is bound by kernel count, and fewer kernels means a shorter CUDA graph replay
(measured on an H100, random 1B Llama, bf16, context 512: 651 -> 212 kernels per step, graph
replay 2.61 -> 1.53 ms at batch 32, 2.94 -> 1.84 ms at batch 64; `python -m
pagemesh.services.executor.model.bench`). Compilation happens on the first call of each shape class, so
warm up before capturing a graph. On CPU (tests, CPU serving) they
run eagerly, so results match transformers operation for operation. PAGEMESH_COMPILE=0 turns
compilation off.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable
from typing import TypeVar, overload

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

Fn = TypeVar("Fn", bound=Callable)


def _compile_enabled() -> bool:
    return os.environ.get("PAGEMESH_COMPILE", "1") not in ("0", "false", "no")


# Typed both ways it is used: `@cuda_compiled` and `@cuda_compiled(token_args=...)`.
@overload
def cuda_compiled(fn: Fn, *, token_args: tuple[int, ...] = ...) -> Fn: ...


@overload
def cuda_compiled(fn: None = None, *, token_args: tuple[int, ...] = ...) -> Callable[[Fn], Fn]: ...


def cuda_compiled(
    fn: Fn | None = None, *, token_args: tuple[int, ...] = (0,)
) -> Fn | Callable[[Fn], Fn]:
    """Run `fn` compiled (one graph) when its first argument is on CUDA.

    Only the token dimension (dim 0 of the positional arguments in `token_args`) is dynamic:
    one compile serves every batch and token bucket, while the hidden sizes stay constants the
    generated kernel can index with. With every dimension dynamic (dynamic=True, before) the
    kernels computed their indices with runtime divisions: on an H200 profile of 8,192-token
    steps the SiLU-mul kernel ran at a third of memory bandwidth and the RoPE/split one at a
    tenth (benchmarks/RESULTS.md, run F).

    Each model configuration (head counts, eps, dtype) is one more specialization of the same
    code object, and dynamo refuses a code object's ninth: a process that has loaded many models
    (a test run) would then fail its next model's forward. Past that limit the new configuration
    runs eagerly (same numerics, more kernels); the ones compiled before keep their kernels."""
    if fn is None:
        return functools.partial(cuda_compiled, token_args=token_args)
    compiled: Callable | None = None
    eager_past_limit = False

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        nonlocal compiled, eager_past_limit
        if not (args[0].is_cuda and _compile_enabled()):
            return fn(*args, **kwargs)
        if compiled is None:
            compiled = torch.compile(fn, fullgraph=True)
        for i in token_args:  # (maybe: a size-1 dim is specialized anyway, as it always was)
            torch._dynamo.maybe_mark_dynamic(args[i], 0)
        try:
            return compiled(*args, **kwargs)
        except torch._dynamo.exc.FailOnRecompileLimitHit:
            if not eager_past_limit:
                eager_past_limit = True
                log.warning("%s: dynamo recompile limit reached, new shapes run eagerly", fn)
            return fn(*args, **kwargs)

    return wrapper


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # transformers' order: normalise in float32, cast back, then scale in the input dtype.
    dtype = x.dtype
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(dtype)


rms_norm = cuda_compiled(_rms_norm)


@cuda_compiled(token_args=(0, 1))
def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(norm(x + residual), x + residual): the residual add fused with the next norm."""
    residual = x + residual
    return _rms_norm(residual, weight, eps), residual


@cuda_compiled
def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


@cuda_compiled(token_args=(0, 1))
def qk_norm_rope(
    qkv: torch.Tensor,  # [T, (Hq + 2 Hkv) * D]
    positions: torch.Tensor,  # [T]
    cos_table: torch.Tensor,  # [max_pos, D]
    sin_table: torch.Tensor,
    q_norm: torch.Tensor | None,  # [D] (Qwen3) or None
    k_norm: torch.Tensor | None,
    num_heads: int,
    num_kv_heads: int,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split the fused projection into q [T, Hq, D], k, v [T, Hkv, D]; per-head RMSNorm on q
    and k when the model has it; RoPE on q and k (the "rotate half" convention)."""
    num_tokens = qkv.shape[0]
    head_dim = cos_table.shape[-1]
    qkv = qkv.view(num_tokens, num_heads + 2 * num_kv_heads, head_dim)
    q, k, v = qkv.split([num_heads, num_kv_heads, num_kv_heads], dim=1)
    if q_norm is not None and k_norm is not None:
        q = _rms_norm(q, q_norm, eps)
        k = _rms_norm(k, k_norm, eps)
    cos = cos_table.index_select(0, positions).unsqueeze(1).to(q.dtype)
    sin = sin_table.index_select(0, positions).unsqueeze(1).to(q.dtype)
    q = q * cos + _rotate_half(q) * sin
    k = k * cos + _rotate_half(k) * sin
    return q, k, v


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)
