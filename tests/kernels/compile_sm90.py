"""Compile every Triton kernel for Hopper (sm_90) ahead of time, no GPU needed.

Run as a script (tests/kernels/test_compile_sm90.py runs it in a subprocess): the kernels must
be imported with TRITON_INTERPRET unset, since Triton decides at decoration time whether a
kernel is compiled or interpreted, and the interpreter tests of this folder set it.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import triton
from pagemesh.kernels import cache_ops, decode_attention, prefill_attention
from triton import compiler
from triton.backends import compiler as backends

SM90 = backends.GPUTarget("cuda", 90, 32)
H100_SHARED_BYTES = 227 * 1024


def _compile(
    fn: Any, types: dict[str, str], consts: dict[str, Any], warps: int, stages: int
) -> Any:
    names = fn.arg_names
    sig = {n: "constexpr" if n in consts else types.get(n, "i32") for n in names}
    # Pointers and strides divisible by 16, as Triton specializes them at run time.
    div16 = [n for n in names if n.endswith("_ptr") or n.startswith("stride")]
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in div16 if n not in consts}
    src = compiler.ASTSource(fn, sig, consts, attrs)
    kernel = triton.compile(src, target=SM90, options={"num_warps": warps, "num_stages": stages})
    assert kernel.metadata.shared <= H100_SHARED_BYTES
    return kernel


def _attn_types(dtype: str, extra: dict[str, str]) -> dict[str, str]:
    types = {n: f"*{dtype}" for n in ("q_ptr", "k_cache_ptr", "v_cache_ptr", "out_ptr")}
    types.update(block_tables_ptr="*i32", seq_lens_ptr="*i32", scale_log2="fp32", **extra)
    return types


def decode_compiles(dtype: str) -> None:
    types = _attn_types(
        dtype,
        {
            "part_acc_ptr": "*fp32", "part_ml_ptr": "*fp32", "counters_ptr": "*i32",
            "query_start_loc_ptr": "*i32",
        },
    )  # fmt: skip
    bn, warps, stages = (32, 4, 5) if dtype == "bf16" else (32, 4, 2)
    # float32 compiles slowly on a CPU: one variant of it, all four of bf16 (the last: the
    # decodes of a mixed step, decode_rows=True).
    variants = (
        [(1, False, False), (8, True, False), (8, False, False), (8, False, True)]
        if dtype == "bf16"
        else [(8, True, False)]
    )
    for splits, fused, mixed in variants:
        consts = dict(
            GROUP=4, GROUP_PAD=16, HEAD_DIM=128, HEAD_PAD=128, PAGE=16, BLOCK_N=bn,
            NUM_SPLITS=splits, NUM_KV_HEADS=8, FUSED_MERGE=fused, SPLIT_PAD=8, MERGE_UNROLL=4,
            F32_DOT=dtype == "fp32", MIXED=mixed,
        )  # fmt: skip
        _compile(decode_attention._decode_kernel, types, consts, warps, stages)
    merge_types = {"part_acc_ptr": "*fp32", "part_ml_ptr": "*fp32", "seq_lens_ptr": "*i32"}
    merge_types.update(out_ptr=f"*{dtype}", query_start_loc_ptr="*i32")
    for mixed in (False, True):
        consts = dict(HEAD_DIM=128, HEAD_PAD=128, NUM_SPLITS=8, SPLIT_PAD=8, MIXED=mixed)
        _compile(decode_attention._merge_kernel, merge_types, consts, 4, 1)


def prefill_compiles(dtype: str) -> None:
    bm, bn, warps, stages = (64, 64, 4, 3) if dtype == "bf16" else (64, 32, 4, 2)
    types = _attn_types(dtype, {"query_start_loc_ptr": "*i32"})
    for head_dim, group in [(128, 4), (96, 1)] if dtype == "bf16" else [(96, 1)]:
        consts = dict(
            GROUP=group, HEAD_DIM=head_dim, HEAD_PAD=128, PAGE=16, BLOCK_M=bm, BLOCK_N=bn,
            F32_DOT=dtype == "fp32", SKIP_SINGLE=group == 4,  # the model's path skips decodes
        )  # fmt: skip
        _compile(prefill_attention._prefill_kernel, types, consts, warps, stages)


def cache_ops_compile() -> None:
    types = {
        "key_ptr": "*fp32", "value_ptr": "*fp32", "key_cache_ptr": "*bf16",
        "value_cache_ptr": "*bf16", "slot_ptr": "*i64",
    }  # fmt: skip
    consts = dict(NUM_KV_HEADS=8, HEAD_DIM=128, HEADS_PAD=8, HEAD_PAD=128, PAGE=16)
    _compile(cache_ops._write_kv_kernel, types, consts, 4, 1)
    types = {"cache_ptr": "*bf16", "mapping_ptr": "*i64"}
    _compile(cache_ops._copy_blocks_kernel, types, dict(BLOCK=4096), 4, 1)


CHECKS: list[tuple[str, Callable[[], None]]] = [
    ("decode bf16", lambda: decode_compiles("bf16")),
    ("decode fp32", lambda: decode_compiles("fp32")),
    ("prefill bf16", lambda: prefill_compiles("bf16")),
    ("prefill fp32", lambda: prefill_compiles("fp32")),
    ("cache ops", cache_ops_compile),
]

if __name__ == "__main__":
    failed = 0
    for name, check in CHECKS:
        try:
            check()
            print(f"ok {name}")
        except Exception as e:
            failed += 1
            print(f"FAILED {name}: {type(e).__name__}: {e}")
    sys.exit(1 if failed else 0)
